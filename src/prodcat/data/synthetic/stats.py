"""Reference numbers from Kaggle's Cdiscount training set that shape the synthetic demo data.

Derived once from the real per-category image counts (5,270 categories, 12,371,293 images) and the reported
images-per-product counts; only these few numbers are kept, never the source files.
"""

from __future__ import annotations

__all__ = ["CATEGORY_SIZE_QUANTILES", "IMAGES_PER_PRODUCT", "REAL_CATEGORIES", "REAL_LEVEL1", "REAL_LEVEL2"]

# Quantiles 0, 1, ..., 100 % of (images in a category / mean images per category): the real long tail.
# Smallest category 0.005 x the mean, median 0.154 x, the largest 34 x.
CATEGORY_SIZE_QUANTILES: tuple[float, ...] = (
    0.005112, 0.00852, 0.01065, 0.01278, 0.01448, 0.01576, 0.0171, 0.01874, 0.02045, 0.02215,
    0.02386, 0.02556, 0.02684, 0.02854, 0.03067, 0.0328, 0.03493, 0.03663, 0.03876, 0.04089,
    0.0426, 0.04473, 0.04686, 0.04984, 0.05197, 0.05495, 0.05708, 0.05921, 0.06262, 0.0656,
    0.06858, 0.07157, 0.0754, 0.07796, 0.08222, 0.08562, 0.08861, 0.09159, 0.09457, 0.09798,
    0.1027, 0.1069, 0.1108, 0.115, 0.1193, 0.1253, 0.1312, 0.1367, 0.1431, 0.1478,
    0.1542, 0.1614, 0.1691, 0.177, 0.186, 0.1942, 0.2006, 0.21, 0.2198, 0.2282,
    0.2391, 0.2522, 0.2637, 0.2799, 0.2931, 0.3062, 0.3253, 0.3413, 0.3574, 0.3777,
    0.4006, 0.4273, 0.4557, 0.4841, 0.518, 0.5482, 0.5831, 0.62, 0.6487, 0.6865,
    0.7496, 0.7991, 0.8588, 0.9269, 1.0, 1.098, 1.192, 1.303, 1.388, 1.51,
    1.663, 1.89, 2.165, 2.529, 2.96, 3.75, 4.781, 6.621, 9.555, 20.33,
    34.23,
)  # fmt: skip

# Products with 1, 2, 3 and 4 pictures in the real train.bson (4,369,441 / 1,128,588 / 542,792 / 1,029,075).
IMAGES_PER_PRODUCT: tuple[float, ...] = (0.6180, 0.1596, 0.0768, 0.1456)

# Size of the real taxonomy: the demo scales its level-1 and level-2 counts from these.
REAL_CATEGORIES = 5270
REAL_LEVEL1 = 49
REAL_LEVEL2 = 486
