"""Reading what a mixture learned: routing reports, statistics, rank analysis."""
