"""The tokenizer spec of a transformers directory or a big_vision `.model` file.

`from_directory(path, max_len=None) -> dict` gives the JSON-able kwargs of
`get_tokenizer(**spec)` (kind, max_len, files as absolute path strings, options) that
reproduce what transformers' `AutoTokenizer.from_pretrained(path)` does with
`padding="max_length", truncation=True, max_length=max_len` (the SigLIP / SigLIP 2
processors' arguments). Nothing is tokenized here; the kinds check the files when built.

Which file, in this order (transformers' choice for each family):
  SigLIP (config.json `model_type: siglip`, tokenizer_class SiglipTokenizer, or a lone
    spiece.model): spiece.model, kind "sentencepiece" with SigLIP's canonicalisation
    (SiglipTokenizer reads only that file);
  any tokenizer.json (SigLIP 2 / Gemma, CLIP, BERT, converted unigram): kind "hf";
    SigLIP 2 (`model_type: siglip2` or Siglip2Tokenizer) lower-cases (transformers
    replaces the hub's GemmaTokenizer by Siglip2Tokenizer for this model type);
  tokenizer.model alone (SentencePiece, e.g. Gemma): kind "sentencepiece", no canonicalisation,
    bos / eos from tokenizer_config.json's add_bos_token / add_eos_token (default none);
  vocab.json + merges.txt: kind "clip" (open_clip's cleaning and padding 0);
  vocab.txt: kind "bert".
A `.model` file (big_vision): kind "sentencepiece" as big_vision's text ops run it: no
canonicalisation, ASCII lower case (`tf.strings.lower`), no bos, eos appended and kept on
truncation (`eos="sticky"`); padded, for `family="siglip"`, with eos (SigLIP's configs:
`tokenize(..., eos="sticky", pad_value=1)`), for `family="siglip2"` with the model's pad piece
(SigLIP 2's `lower|tok(length=64, model="gemma", bos="no", eos="sticky")`, whose padding is
the tokenizer's `pad_token`). family None: "siglip2" when the model defines a bos piece
(Gemma's vocabulary), else "siglip" (T5's c4_en / mc4 vocabularies define none).
max_len: the argument, else tokenizer_config.json's model_max_length when it is a real
limit, else the family's (SigLIP / SigLIP 2: 64, CLIP: 77); none of those -> ValueError.
"""
import json
import pathlib

from vljax.tokenizers.spm import load_model

LOOKED_FOR = ("spiece.model", "tokenizer.json", "tokenizer.model", "vocab.json + merges.txt",
              "vocab.txt")
FAMILY_MAX_LEN = {"siglip": 64, "siglip2": 64, "clip": 77}
# transformers' class attribute `padding_side` where it is not "right".
LEFT_PADDING_CLASSES = ("GemmaTokenizer", "Siglip2Tokenizer")
# transformers' class defaults of the special tokens, used where the configs name none.
_GEMMA = {"pad_token": "<pad>", "eos_token": "<eos>", "bos_token": "<bos>", "unk_token": "<unk>",
          "mask_token": "<mask>"}
CLASS_SPECIALS = {"siglip2": _GEMMA, "gemma": _GEMMA,
                  "clip": {"pad_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}}
_HUGE = 10**6  # model_max_length above this is transformers' "no limit" sentinel


def _read_json(path) -> dict:
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable JSON ({e})") from None


def _token(value):
    """A special token as the configs write it: a string or an AddedToken dict."""
    return value.get("content") if isinstance(value, dict) else value


def _max_len(max_len, family, tcfg, where):
    if max_len is not None:
        return int(max_len)
    stored = tcfg.get("model_max_length")
    if isinstance(stored, int) and 0 < stored < _HUGE:
        return stored
    if family in FAMILY_MAX_LEN:
        return FAMILY_MAX_LEN[family]
    raise ValueError(f"{where}: no max_len given, no model_max_length in tokenizer_config.json "
                     f"and no family default for {family!r}: pass max_len")


def _big_vision(model_file, max_len, family) -> dict:
    sp = load_model(model_file)
    if family is None:
        family = "siglip2" if sp.bos_id() >= 0 else "siglip"
    if family not in ("siglip", "siglip2"):
        raise ValueError(f"{model_file}: family={family!r}, expected 'siglip' or 'siglip2'")
    spec = {"kind": "sentencepiece", "max_len": int(max_len or 64), "model_file": str(model_file),
            "canonicalize": "none", "lower": "ascii"}
    if family == "siglip2":
        if sp.pad_id() < 0:
            raise ValueError(f"{model_file}: the model defines no pad piece (SigLIP 2 pads with it)")
        spec["pad_token"] = sp.id_to_piece(sp.pad_id())
    return spec


def from_directory(path, max_len=None, *, family=None) -> dict:
    """The spec kwargs of the tokenizer a directory (or a `.model` file) ships; see module doc.

    family: for a `.model` file only, "siglip" | "siglip2" (big_vision's padding rule)."""
    root = pathlib.Path(path).expanduser().resolve()
    if root.is_file():
        if root.suffix != ".model":
            raise ValueError(f"{root}: a file that is not a SentencePiece .model; give a "
                             "transformers directory or a .model file")
        return _big_vision(root, max_len, family)
    if not root.is_dir():
        raise ValueError(f"{root}: no such directory or .model file")
    cfg = _read_json(root / "config.json")
    tcfg = _read_json(root / "tokenizer_config.json")
    names = dict(tcfg)
    if "added_tokens_decoder" not in tcfg:  # transformers' legacy path: the map wins
        names.update(_read_json(root / "special_tokens_map.json"))
    model_type = cfg.get("model_type") or cfg.get("text_config", {}).get("model_type")
    cls = (tcfg.get("tokenizer_class") or "").removesuffix("Fast")
    family = {"SiglipTokenizer": "siglip", "Siglip2Tokenizer": "siglip2",
              "CLIPTokenizer": "clip", "GemmaTokenizer": "gemma"}.get(cls, model_type)
    if model_type in ("siglip", "siglip2", "clip") and not (model_type == "siglip"
                                                          and cls == "GemmaTokenizer"):
        # transformers: the model type's class beats the hub's class, except a GemmaTokenizer
        # in a "siglip" directory (fixed-resolution SigLIP 2): transformers keeps Gemma's.
        family = model_type
    defaults = CLASS_SPECIALS.get("gemma" if cls == "GemmaTokenizer" and family != "siglip2"
                                  else family, {})
    extra = [_token(t) for key in ("additional_special_tokens", "extra_special_tokens")
             if isinstance(names.get(key), list) for t in names[key]]  # a dict: named, not extra
    files = ("spiece.model", "tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt",
             "vocab.txt")
    has = {name: (root / name).is_file() for name in files}

    if has["spiece.model"] and (family == "siglip" or not has["tokenizer.json"]):
        if tcfg.get("legacy") is False:
            raise ValueError(f"{root / 'tokenizer_config.json'}: legacy=false (no dummy prefix) "
                             "is not supported for spiece.model")
        eos = _token(names.get("eos_token")) or "</s>"
        return {"kind": "sentencepiece", "max_len": _max_len(max_len, "siglip", tcfg, root),
                "model_file": str(root / "spiece.model"), "canonicalize": "siglip",
                "lower": "str" if tcfg.get("do_lower_case", True) else "none",
                "eos_token": eos, "unk_token": _token(names.get("unk_token")) or "<unk>",
                "pad_token": _token(names.get("pad_token")) or eos,
                "special_tokens": [t for t in extra if t]}
    if family == "siglip":
        raise ValueError(f"{root}: a SigLIP directory without spiece.model (transformers' "
                         "SiglipTokenizer reads only that file)")
    stored = (_read_json(root / "tokenizer.json").get("padding") if has["tokenizer.json"]
              else None) or {}
    side = (tcfg.get("padding_side") or str(stored.get("direction", "")).lower()
            or ("left" if cls in LEFT_PADDING_CLASSES or family == "siglip2" else "right"))
    if has["tokenizer.json"]:
        spec = {"kind": "hf", "max_len": _max_len(max_len, family, tcfg, root),
                "tokenizer_file": str(root / "tokenizer.json"), "lowercase": family == "siglip2",
                "padding_side": side}
        for key in ("pad_token", "eos_token"):
            if _token(names.get(key)) or key in defaults:
                spec[key] = _token(names.get(key)) or defaults[key]
        return spec
    if has["tokenizer.model"]:
        spec = {"kind": "sentencepiece", "max_len": _max_len(max_len, family, tcfg, root),
                "model_file": str(root / "tokenizer.model"), "canonicalize": "none",
                "lower": "rust" if family == "siglip2" else "none",
                "add_bos": bool(tcfg.get("add_bos_token", False)),
                "add_eos": bool(tcfg.get("add_eos_token", False)), "padding_side": side}
        for key in ("pad_token", "eos_token"):
            if _token(names.get(key)) or key in defaults:
                spec[key] = _token(names.get(key)) or defaults[key]
        # transformers converts the model to a Rust tokenizer whose special tokens match
        # literally in the text.
        named = [_token(names.get(k)) or defaults.get(k) for k in
                 ("bos_token", "eos_token", "unk_token", "pad_token", "mask_token")]
        spec["special_tokens"] = list(dict.fromkeys(t for t in named + extra if t))
        return spec
    if has["vocab.json"] and has["merges.txt"]:
        return {"kind": "clip", "max_len": _max_len(max_len, "clip", tcfg, root),
                "vocab": str(root / "vocab.json"), "merges": str(root / "merges.txt")}
    if has["vocab.txt"]:
        return {"kind": "bert", "max_len": _max_len(max_len, family, tcfg, root),
                "vocab_file": str(root / "vocab.txt"),
                "lowercase": bool(tcfg.get("do_lower_case", True))}
    raise ValueError(f"{root}: no tokenizer found (looked for {', '.join(LOOKED_FOR)})")
