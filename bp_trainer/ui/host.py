"""What the tab needs from its surroundings: the `Host` protocol.

The WebUI implementation lives in `scripts/` (it talks to `modules.*`); the standalone one is
`StandaloneHost` in `bp_trainer.ui.standalone`. The tab calls only these methods, so the same UI code
runs in both places and is testable with a fake host.
"""

from __future__ import annotations

from typing import Any, Protocol


class Host(Protocol):
    name: str  # "webui" or "standalone"

    # Models
    def list_checkpoints(self) -> list[str]:
        """Display names of the available checkpoints (the WebUI's checkpoint titles)."""

    def checkpoint_path(self, name: str) -> str:
        """File path of a checkpoint named by `list_checkpoints`."""

    def list_vaes(self) -> list[str]:
        """Display names of the available VAE files."""

    def vae_path(self, name: str) -> str:
        """File path of a VAE named by `list_vaes`."""

    def refresh_models(self) -> None:
        """Re-scan checkpoints and VAEs (after a merge or a training save)."""

    def checkpoint_dir(self) -> str:
        """Folder where merged/trained checkpoints are written so they show up in the checkpoint list."""

    # Tokenizer
    def tokenizer(self) -> Any:
        """A CLIPTokenizer-like object: the loaded model's when there is one, else the offline vocabulary's."""

    # Optional (looked up with getattr; a host without it gets the defaults):
    #   def prompt_settings(self) -> dict:
    #       """The host's prompt settings as keyword arguments of `bp_trainer.tokens.inspect_prompt`, so the
    #       Tokens tab counts as the WebUI's prompt box does: `emphasis` (bool: opts.emphasis != "None"),
    #       `backtrack` (int: opts.comma_padding_backtrack), `use_old_scheduling` (bool), `embeddings`
    #       ({name: vectors} of the loaded textual inversions)."""
    #   def trainer_env_status(self) -> dict:  # {"state": "ready"|..., "message": str}; see bp_trainer.trainer_env
    #   def embeddings_dir(self) -> str:
    #       """The host's textual-inversion folder (WebUI: --embeddings-dir): a run's tag embeddings are published
    #       into its `bp-train/` sub-folder after each save."""
    #   def reload_embeddings(self) -> None:
    #       """Re-read that folder now (WebUI: the embedding database, forced)."""
    #   def has_gpu(self) -> bool:
    #       """Whether the host generates on a GPU (the WebUI: its device is not the CPU). Only the wording of
    #       the hand-off messages depends on it; without it the messages speak of the GPU."""

    # Training
    def runs_dir(self) -> str:
        """Folder holding one sub-folder per training run."""

    def trainer_python(self) -> str:
        """Python executable of the trainer's own environment."""

    def release_gpu(self) -> None:
        """Before a run: move the host's model off the GPU (and make generation wait, unless opted out)."""

    def reclaim_gpu(self) -> None:
        """After a run: take the GPU back (model back to the device; generation may run again)."""

    def generation_may_run_during_training(self) -> bool:
        """The user's setting: let generation run while a training run holds the GPU."""
