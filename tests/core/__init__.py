"""Tests of molora.core: config, experts, routers, losses, the layer and the patcher."""
