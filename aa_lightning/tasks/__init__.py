"""LightningModules: image classification and RetinaNet detection."""
