"""The trainer: `accelerate launch -m bp_trainer.train RUN.yaml` (or `python -m bp_trainer train`).

Light modules (importable in the WebUI process, no torch/diffusers/accelerate at import time):
`config` (schema, defaults, validation, presets), `events` (events.jsonl writer and follower).
Heavy modules (the training process only): `run`, `models`, `ema`, `latents`, `sampling`, `saving`, `state`.
"""
