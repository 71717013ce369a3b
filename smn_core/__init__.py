"""smn_core: the Self-Masking Networks method in plain PyTorch (never imports ray).

Modules: ``masking`` (scores, threshold masks, straight-through), ``swav`` (SwAV loss,
Sinkhorn-Knopp, queue), ``data`` (dataset registry), ``augment`` (multi-crop and eval
transforms), ``backbones`` (backbone registry), ``evaluation`` (embeddings, k-NN, linear
probe), ``training`` (the per-worker training loop).
"""

__version__ = "0.1.0"
