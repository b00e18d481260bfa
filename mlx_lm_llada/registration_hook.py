"""Registers our model types with an unchanged mlx-lm, at interpreter start.

``mlx_lm_llada.pth`` calls :func:`install`, which puts one finder on
``sys.meta_path``. Until ``mlx_lm`` is imported it only compares module names:
nothing of mlx, mlx-lm or transformers is imported at start-up.

When mlx-lm is imported, the finder

- makes ``mlx_lm.models.<model_type>`` resolve to our model file, for every
  type in :data:`MODEL_MODULES`, and a model type that several architectures
  share pick its module by architecture (:data:`MODEL_ARCHITECTURES`);
- makes ``mlx_lm.generate.generate_step`` defer to a model's own
  ``generate_step`` (the generic change that ``patches/0001`` proposes), and
  refuses speculative and batched decoding for such models;
- fills in the special-token ids that a diffusion config lacks and keeps
  transformers from asking about the checkpoint's remote code;
- makes the commands that assume a causal model refuse a diffusion model,
  and `mlx_lm.lora` train one with the masked-diffusion loss;
- lets ``mlx_lm.server`` take a request's diffusion settings and answer its
  errors with a status.

``MLX_LM_LLADA_DISABLE=1`` turns all of it off.
"""

import os
import sys

MODEL_MODULES = {
    "llada": "mlx_lm_llada.models.llada",
    "Dream": "mlx_lm_llada.models.dream",
    "llada_moe": "mlx_lm_llada.models.llada_moe",
    "llada2_moe": "mlx_lm_llada.models.llada2_moe",
    "diffusion_gemma": "mlx_lm_llada.models.diffusion_gemma",
}

# (model_type, architecture) -> the model module, for mlx-lm's own
# MODEL_ARCHITECTURE_REMAPPING: LLaDA-MoE's config says model_type "llada".
MODEL_ARCHITECTURES = {("llada", "LLaDAMoEModelLM"): "llada_moe"}

_DISABLE_VAR = "MLX_LM_LLADA_DISABLE"


def _disabled():
    return os.environ.get(_DISABLE_VAR, "").strip().lower() in ("1", "true", "yes")


class _AliasLoader:
    """Loads ``mlx_lm.models.<type>`` as our module (the same module object)."""

    def __init__(self, target):
        self.target = target

    def create_module(self, spec):
        import importlib

        return importlib.import_module(self.target)

    def exec_module(self, module):
        pass


class _PatchingLoader:
    """Runs the real loader of an mlx-lm module, then our patch on it."""

    def __init__(self, loader, patch):
        self.loader = loader
        self.patch = patch

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        self.patch(module)

    def __getattr__(self, name):
        return getattr(self.loader, name)


class MlxLmFinder:
    """A meta-path finder that only answers for a few ``mlx_lm`` modules."""

    def find_spec(self, fullname, path=None, target=None):
        if not fullname.startswith("mlx_lm."):
            return None
        from importlib.machinery import ModuleSpec, PathFinder

        prefix, _, model_type = fullname.rpartition(".")
        if prefix == "mlx_lm.models" and model_type in MODEL_MODULES:
            return ModuleSpec(fullname, _AliasLoader(MODEL_MODULES[model_type]))

        patch = _PATCHES.get(fullname)
        if patch is None:
            return None
        spec = PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _PatchingLoader(spec.loader, patch)
        return spec


def install():
    """Install the finder (idempotent); never raises."""
    try:
        if _disabled():
            return
        if any(isinstance(f, MlxLmFinder) for f in sys.meta_path):
            return
        sys.meta_path.insert(0, MlxLmFinder())
        if "mlx_lm" in sys.modules:
            # Installed late (not from the .pth): patch what is loaded already.
            for name, patch in _PATCHES.items():
                if name in sys.modules:
                    patch(sys.modules[name])
    except Exception:  # pragma: no cover - start-up must never break
        pass


def _patch_generate(module):
    from . import mlx_lm_patches

    mlx_lm_patches.patch_generate(module)


def _patch_utils(module):
    from . import mlx_lm_patches

    mlx_lm_patches.patch_utils(module)


def _patch_causal_only(module):
    from . import mlx_lm_patches

    mlx_lm_patches.patch_causal_only(module)


def _patch_lora(module):
    from . import mlx_lm_patches

    mlx_lm_patches.patch_lora(module)


def _patch_server(module):
    from . import mlx_lm_patches

    mlx_lm_patches.patch_server(module)


_PATCHES = {
    "mlx_lm.generate": _patch_generate,
    "mlx_lm.server": _patch_server,
    "mlx_lm.utils": _patch_utils,
    "mlx_lm.perplexity": _patch_causal_only,
    "mlx_lm.evaluate": _patch_causal_only,
    "mlx_lm.lora": _patch_lora,
}
