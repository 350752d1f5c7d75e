"""What a mixture is: config, experts, routers, losses, the routing context, the layer and the patcher."""
