"""The Lightning layer (extra ``[lightning]``): ``CEDecompositionCallback`` and the sinks that record each
validation exactly once (npz state first, then W&B, CSV and the other loggers, back-filled on resume)."""
