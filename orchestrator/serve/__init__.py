"""Serve many tasks from one backbone: a masked forward per task (:mod:`orchestrator.serve.model`, plain PyTorch,
usable in a script) and the Ray Serve application over a mask store (:mod:`orchestrator.serve.app`)."""
