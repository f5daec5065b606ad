"""Pictures of a store for people: the quick look, one frame's overlay, the napari and 3D views."""
