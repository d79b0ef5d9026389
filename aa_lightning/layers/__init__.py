"""Layers: the functional relative attention core and the AugmentedConv2d module."""
