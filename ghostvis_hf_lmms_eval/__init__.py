"""`lmms-eval --model ghostvis`: lmms-eval's own `huggingface` chat model, loading the model with its LM head.

NOTE: lmms-eval 0.7.3's `huggingface` model picks the class to load with
`config.model_type in AutoModelForCausalLM._model_mapping.keys()`, which tests a string against a list of config
classes and is never true: every checkpoint loads through `AutoModel`. For a vision-language model that is the base
model, without the LM head or `generate` (transformers' own VLMs too: Qwen2.5-VL loads as `Qwen2_5_VLModel`). GhostVis
keeps `AutoModel` -> base model (transformers' convention, and what vLLM's Transformers backend loads), so this subclass
changes that choice: same chat template, processor call and `generate`. It also takes a `dtype` model argument
(lmms-eval always loads in bfloat16; `dtype=float32` reproduces `ghostvis eval`'s float32 answers). lmms-eval finds it
through the `lmms_eval.models` entry point in pyproject.toml. Remove it when lmms-eval compares config classes (or
loads `AutoModelForImageTextToText` itself) and takes a dtype.

Why a package of its own: lmms-eval imports every entry point when it starts. Importing `ghostvis_hf` registers its
classes with the Auto classes, and transformers (5.24) then loads those instead of the checkpoint's own
configuration/modeling/processing files even with `trust_remote_code=True`. Kept apart (it imports neither `ghostvis_hf`
nor, until lmms-eval asks for the class, lmms-eval), the plugin leaves lmms-eval running the code the checkpoint ships.
"""

MODEL_ID = "ghostvis"


def manifest():
    """The `lmms_eval.models` entry point: model id `ghostvis`, served by the chat class `GhostVis` of this module."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, chat_class_path=f"{__name__}.GhostVis")


def _ghostvis_class():
    from lmms_eval.models.chat import huggingface
    from transformers import AutoModelForImageTextToText

    class _Loader:
        """Stands in for `AutoModel` in lmms-eval's constructor: loads with the LM head, in `dtype` if one is given."""

        def __init__(self, dtype):
            self.dtype = dtype

        def from_pretrained(self, path, **kwargs):
            if self.dtype is not None:
                kwargs.pop("torch_dtype", None)
                kwargs["dtype"] = self.dtype
            return AutoModelForImageTextToText.from_pretrained(path, **kwargs)

    class GhostVis(huggingface.Huggingface):
        """lmms-eval's `huggingface` chat model (its arguments: `pretrained`, `device`, `device_map`, `batch_size`,
        `trust_remote_code`, ...), loading the checkpoint through `AutoModelForImageTextToText`.

        Args:
            dtype (`str`, *optional*): `float32`, `bfloat16`, `auto` (the checkpoint's); lmms-eval's bfloat16 if
                not given.
        """

        def __init__(self, *args, dtype: str | None = None, **kwargs):
            # The class lmms-eval falls back to is its module's global `AutoModel`: swap it for this constructor only.
            fallback, huggingface.AutoModel = huggingface.AutoModel, _Loader(dtype)
            try:
                super().__init__(*args, **kwargs)
            finally:
                huggingface.AutoModel = fallback

    GhostVis.__qualname__ = "GhostVis"
    return GhostVis


def __getattr__(name):
    if name == "GhostVis":
        globals()["GhostVis"] = cls = _ghostvis_class()
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
