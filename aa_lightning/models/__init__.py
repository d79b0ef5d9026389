"""AA networks registered as timm models (importing this module registers them)."""
