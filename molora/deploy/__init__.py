"""The mixture to and from files and plain weights: adapter files, merging, INT8, PEFT's format."""
