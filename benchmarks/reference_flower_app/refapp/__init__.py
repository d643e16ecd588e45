"""refapp: a plain Flower app with Opacus DP-SGD, written like Flower's Opacus example."""
