"""Class names of the benchmark label sets: facts both the data layer (datasets) and the model
layer (released weights) need, so they live below both (no imports)."""

__all__ = ["NYU40_CLASSES"]

# NYUDv2 40-class set of Gupta et al. (CVPR 2013), in label order 0..39 (the official 0 = void
# becomes 255 in the prepared labels).
NYU40_CLASSES = [
    "wall",
    "floor",
    "cabinet",
    "bed",
    "chair",
    "sofa",
    "table",
    "door",
    "window",
    "bookshelf",
    "picture",
    "counter",
    "blinds",
    "desk",
    "shelves",
    "curtain",
    "dresser",
    "pillow",
    "mirror",
    "floor mat",
    "clothes",
    "ceiling",
    "books",
    "refrigerator",
    "television",
    "paper",
    "towel",
    "shower curtain",
    "box",
    "whiteboard",
    "person",
    "night stand",
    "toilet",
    "sink",
    "lamp",
    "bathtub",
    "bag",
    "otherstructure",
    "otherfurniture",
    "otherprop",
]
