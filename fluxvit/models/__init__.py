"""FluxViT model zoo: registry, model, the InternVideo2 teacher, attention backends, selector and checkpoint I/O
(objective-free)."""
from .attention import BACKENDS, available_backends, force_backend, has_flash_attn, varlen_attention
from .checkpoint import LoadReport, load_model, load_official_checkpoint, read_state_dict, save_model
from .hub import from_pretrained, save_pretrained
from .fluxvit import FluxFeatures, FluxViT, FluxViTConfig
from .internvideo2 import InternVideo2, InternVideo2Config, InternVideo2Features, TeacherForward
from .registry import UnknownOptionError, create_model, list_models, model_config  # registers the zoo with timm
from .selector import num_groups, select_tokens, token_scores

__all__ = [
    "BACKENDS", "FluxFeatures", "FluxViT", "FluxViTConfig", "InternVideo2", "InternVideo2Config",
    "InternVideo2Features", "LoadReport", "TeacherForward", "UnknownOptionError",
    "available_backends", "create_model", "force_backend", "from_pretrained", "has_flash_attn", "list_models",
    "load_model", "load_official_checkpoint", "model_config", "num_groups", "read_state_dict",
    "save_model", "save_pretrained", "select_tokens", "token_scores", "varlen_attention",
]
