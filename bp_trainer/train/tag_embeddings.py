"""The trained vectors of a run's tag embeddings, and their files.

    emb = TagEmbeddings.create(plans, token_embedding_weight)      # plans: bp_trainer.train.embeddings
    optimizer groups += emb.param_group(lr)                         # its own learning rate, no weight decay
    emb.set_trainable(step, train_steps)                            # the first N steps only, or throughout
    emb.sync_grads(accelerator)                                     # before each update: identical on every rank
    emb.export(run_dir, metadata=...)                               # at each save (main process)

Files (at each save; the newest save's vectors):
- `RUN_DIR/embeddings/<name>.safetensors`: the WebUI form, one tensor `emb_params` [vectors, dim] (fp32), which
  WebUI v1.10.1 loads from its embeddings folder under the file's name; metadata: tag, step, base checkpoint hash.
- `RUN_DIR/embeddings-diffusers/<name>/learned_embeds.safetensors`: the diffusers form `{name: [vectors, dim]}`
  (`pipeline.load_textual_inversion(folder)`); a `saving.diffusers` folder gets a copy in `embeddings/<name>/`.
- `state/step-N/embeddings.safetensors`: the vectors by name, for an exact resume.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch

from bp_trainer.errors import BPError
from bp_trainer.train.embeddings import TagPlan, init_groups

WEBUI_KEY = "emb_params"
DIFFUSERS_DIR = "embeddings-diffusers"
DIFFUSERS_FILE = "learned_embeds.safetensors"
STATE_FILE = "embeddings.safetensors"


def initial_vectors(plan: TagPlan, token_embeddings: torch.Tensor) -> torch.Tensor:
    """[vectors, dim] fp32 start of one embedding: its source tokens' rows (or their neighbourhood means)."""
    rows = token_embeddings.detach().to("cpu", torch.float32)[list(plan.init_ids)]
    groups = init_groups(len(plan.init_ids), plan.vectors)
    return torch.stack([rows[g[0]] if len(g) == 1 else rows[g].mean(0) for g in groups]).clone()


class TagEmbeddings(torch.nn.Module):
    """One fp32 parameter [vectors, dim] per planned tag; `lookup` finds them in token ids."""

    def __init__(self, plans: Sequence[TagPlan], vectors: Sequence[torch.Tensor]):
        super().__init__()
        from bp_trainer.train.embedding_text import alias_lookup

        self.plans = list(plans)
        self.vectors = torch.nn.ParameterList([torch.nn.Parameter(v.detach().clone().float()) for v in vectors])
        self.lookup = alias_lookup(self.plans)
        self.sizes = {p.name: p.vectors for p in self.plans}
        self.starts: Dict[str, int] = {}
        at = 0
        for p in self.plans:
            self.starts[p.name] = at
            at += p.vectors

    @classmethod
    def create(cls, plans: Sequence[TagPlan], token_embeddings: torch.Tensor) -> "TagEmbeddings":
        return cls(plans, [initial_vectors(p, token_embeddings) for p in plans])

    @property
    def names(self) -> List[str]:
        return [p.name for p in self.plans]

    def stacked(self) -> torch.Tensor:
        """Every vector, [total vectors, dim], in plan order (`starts` index it)."""
        return torch.cat(list(self.vectors))

    # ------------------------------------------------------------------------------------------ training

    def param_group(self, lr: float) -> Dict[str, Any]:
        return {"params": list(self.vectors), "lr": lr, "base_lr": lr, "weight_decay": 0.0}

    def set_trainable(self, step: int, train_steps: int) -> bool:
        """Train at `step` (0-based updates done) when `train_steps` is 0 or not reached yet; returns that."""
        on = not train_steps or step < train_steps
        for p in self.vectors:
            p.requires_grad_(on)
        return on

    def sync_grads(self, accelerator: Any) -> None:
        """Before an update: every trained vector has a gradient (zeros where no caption held its tag), averaged
        over the processes as DDP averages the model's, so the vectors stay identical on every rank."""
        params = [p for p in self.vectors if p.requires_grad]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if not params or accelerator.num_processes <= 1:
            return
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        flat = accelerator.reduce(flat, reduction="mean")
        for p, g in zip(params, torch.split(flat, [p.numel() for p in params])):
            p.grad.copy_(g.reshape(p.shape))

    # ------------------------------------------------------------------------------------------ state

    def state_tensors(self) -> Dict[str, torch.Tensor]:
        return {p.name: v.detach().to("cpu", torch.float32).contiguous() for p, v in zip(self.plans, self.vectors)}

    def save_state(self, state_dir: "str | os.PathLike[str]") -> None:
        from safetensors.torch import save_file

        save_file(self.state_tensors(), str(Path(state_dir) / STATE_FILE))

    def load_state(self, state_dir: "str | os.PathLike[str]") -> None:
        """Restore the vectors of a saved state (the same tags, same sizes), or refuse clearly."""
        from safetensors.torch import load_file

        path = Path(state_dir) / STATE_FILE
        if not path.is_file():
            raise BPError("the saved state has no tag embeddings, but the run trains some", path=path,
                          hint="resume with the run's own config (embeddings as when it started)")
        saved = load_file(str(path))
        if set(saved) != set(self.names) or any(saved[p.name].shape != v.shape for p, v in zip(self.plans, self.vectors)):
            raise BPError(f"the saved state's embeddings ({', '.join(sorted(saved))}) differ from the run's "
                          f"({', '.join(self.names)})", path=path,
                          hint="the dataset or embeddings config changed since the run started; start a new run")
        with torch.no_grad():
            for p, v in zip(self.plans, self.vectors):
                v.copy_(saved[p.name].to(v.device, v.dtype))

    # ------------------------------------------------------------------------------------------ files

    def export(self, run_dir: Any, *, metadata: Mapping[str, str]) -> List[Dict[str, Any]]:
        """Write both forms of every embedding; returns one record per embedding (for the checkpoint event)."""
        from bp_trainer.rundir import RunDir

        rd = RunDir(run_dir)
        records = []
        for plan, tensor in zip(self.plans, self.state_tensors().values()):
            meta = dict(metadata, bp_embedding_tag=plan.tag, bp_embedding_name=plan.name,
                        bp_embedding_trained_as=plan.train_text, bp_embedding_vectors=str(plan.vectors))
            res = write_webui_embedding(tensor, rd.embeddings / f"{plan.name}.safetensors", meta)
            diffusers = write_diffusers_embedding(tensor, plan.name, rd.path / DIFFUSERS_DIR / plan.name, meta)
            records.append({"name": plan.name, "tag": plan.tag, "vectors": plan.vectors, "path": res["out"],
                            "sha256": res["sha256"], "autov2": res["autov2"], "diffusers": str(diffusers)})
        return records

    def write_diffusers_forms(self, folder: Path, metadata: Mapping[str, str]) -> None:
        """The diffusers forms into `folder/<name>/` (a `saving.diffusers` folder's `embeddings/`)."""
        for plan, tensor in zip(self.plans, self.state_tensors().values()):
            write_diffusers_embedding(tensor, plan.name, folder / plan.name, dict(metadata, bp_embedding_tag=plan.tag))


def write_webui_embedding(tensor: torch.Tensor, path: Path, metadata: Mapping[str, str]) -> Dict[str, Any]:
    from bp_trainer.checkpoint.io import write_checkpoint

    return write_checkpoint({WEBUI_KEY: tensor}, path, metadata, "safetensors", "fp32")


def write_diffusers_embedding(tensor: torch.Tensor, name: str, folder: Path, metadata: Mapping[str, str]) -> Path:
    from bp_trainer.checkpoint.io import write_checkpoint

    out = folder / DIFFUSERS_FILE
    write_checkpoint({name: tensor}, out, metadata, "safetensors", "fp32")
    return out


def token_embedding_weight(text_encoder: Any, originals: Optional[Mapping[str, torch.Tensor]]) -> torch.Tensor:
    """The token-embedding matrix as loaded (fp32): from the frozen encoder's originals when the device copy may
    be cast, else the encoder's own weight."""
    for key, value in (originals or {}).items():
        if key.endswith("token_embedding.weight"):
            return value
    return getattr(text_encoder, "module", text_encoder).get_input_embeddings().weight


def base_model_hashes(base: Any) -> Dict[str, str]:
    """{"sha256", "autov2"} of a single-file base model (the WebUI's checkpoint hash; cached), {} for a folder."""
    if not base or not os.path.isfile(base):
        return {}
    from bp_trainer.checkpoint.hashcache import cached_file_hashes

    h = cached_file_hashes(base)
    return {"sha256": h["sha256"], "autov2": h["autov2"]}


def setup_for_run(cfg: Any, models: Any, captions: Sequence[str], *, originals: Mapping[str, Any], device: Any,
                  accelerator: Any, warn: Any) -> Optional["RunEmbeddings"]:
    """The run's tag embeddings on `device` (None when `embeddings:` chooses none)."""
    from bp_trainer.train.embeddings import plan_embeddings

    section = cfg.embeddings
    if not section.enabled:
        return None
    if getattr(getattr(accelerator, "state", None), "deepspeed_plugin", None) is not None:
        raise BPError("tag embeddings are not trained under DeepSpeed", path="embeddings",
                      hint="train them without a DeepSpeed accelerate config, or remove the embeddings: section")
    plans = plan_embeddings(section, captions, models.tokenizer,
                            underscores_to_spaces=bool(cfg.dataset.underscores_to_spaces), warn=warn)
    if not plans:
        warn(f"embeddings: no tag qualifies (auto: a mangled tag in at least {section.auto.min_images} images); "
             "none are trained" if section.auto else "embeddings: no tags listed; none are trained")
        return None
    weight = token_embedding_weight(models.text_encoder, originals.get("text_encoder"))
    emb = RunEmbeddings(plans, [initial_vectors(p, weight) for p in plans], cfg=cfg)
    return emb.to(device)


class RunEmbeddings(TagEmbeddings):
    """A run's TagEmbeddings with what its files record: tag, step, the base model's and checkpoint's hashes."""

    def __init__(self, plans: Sequence[TagPlan], vectors: Sequence[torch.Tensor], *, cfg: Any):
        super().__init__(plans, vectors)
        self.cfg = cfg
        self._base: Optional[Dict[str, str]] = None

    def save_metadata(self, step: int, epoch: int, checkpoint: Optional[Mapping[str, Any]]) -> Dict[str, str]:
        if self._base is None:
            self._base = base_model_hashes(self.cfg.model.base)
        meta = {"bp_train_step": str(step), "bp_train_epoch": str(epoch), "bp_train_run": str(self.cfg.run.name),
                "bp_train_clip_skip": str(self.cfg.model.clip_skip),
                "bp_base_model": os.path.basename(str(self.cfg.model.base)),
                "bp_base_sha256": self._base.get("sha256", ""), "bp_base_autov2": self._base.get("autov2", "")}
        if checkpoint:
            meta.update(bp_checkpoint=os.path.basename(str(checkpoint.get("path", ""))),
                        bp_checkpoint_autov2=str(checkpoint.get("autov2", "")))
        return meta
