"""The mask store: one frozen backbone and many task masks (paper Table 1 "Size", App. C)."""
