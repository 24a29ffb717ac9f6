"""What an exported model needs besides its weights to be used with ``transformers`` alone.

The tokenizer: our SentencePiece model (unigram, identity normalisation, byte fallback, language
tags ``<2xx>`` and ``<sep>`` as user symbols) written as a ``tokenizers`` ``tokenizer.json`` (plain
JSON: no extra dependency here) that gives the same ids as SentencePiece: the unigram pieces with
their scores, spaces as ``▁`` with one prepended to each text segment (SentencePiece's dummy
prefix), bytes for unknown characters, and the special symbols as added tokens matched before the
model runs, so ``<2de>`` + source + ``<sep>`` becomes exactly the ids the model was trained on
(``tests/multirank/test_convert.py`` compares them on every pair of the bundled sample). The
``tokenizer.model`` itself is kept for SentencePiece users.

``generation_config.json``: end and padding ids and the decoding the run's config asks for
(greedy or beam search, the longest target). ``README.md``: the prompt format and a three-line
``transformers`` example (the one the README of this project shows and a test runs).

A tokenizer that ``preprocess --tokenizer`` brought in (another SentencePiece model, a
``tokenizer.json``) is shipped as it is, with the ids of ``meta.json``; where the data added
language tags or ``<sep>`` after its vocabulary, the export's README lists their ids (the shipped
tokenizer does not know them).
"""

from __future__ import annotations

import json
from pathlib import Path

from megatron_moe.data.preprocess import BOS, EOS, PAD, SEP, UNK, lang_tag

SPACE = "\u2581"  # SentencePiece's whitespace symbol


def tokenizer_json(sp) -> dict:
    """``tokenizers``' serialisation of SentencePiece processor ``sp`` (a unigram model)."""
    pieces = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    added = [{"id": i, "content": piece, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True}
             for i, (piece, _) in enumerate(pieces)
             if sp.is_control(i) or sp.is_unknown(i) or _user_symbol(piece)]
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": None,  # identity: the model was trained without normalisation
        "pre_tokenizer": {"type": "Metaspace", "replacement": SPACE, "prepend_scheme": "always",
                          "split": False},
        "post_processor": None,
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": SPACE}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "model": {"type": "Unigram", "unk_id": UNK, "byte_fallback": True,
                  "vocab": [[piece, score] for piece, score in pieces]},
    }


def _user_symbol(piece: str) -> bool:
    return piece == SEP or (piece.startswith("<2") and piece.endswith(">"))


def own_layout(sp) -> bool:
    """Whether ``sp`` is a model ``preprocess`` trained (the layout :func:`tokenizer_json` maps)."""
    return ((sp.pad_id(), sp.unk_id(), sp.bos_id(), sp.eos_id()) == (PAD, UNK, BOS, EOS)
            and not sp.is_unknown(sp.piece_to_id(SEP)))


def write(path: str, meta: dict, cfg, directory: Path, source: str) -> str:
    """Ship the tokenizer at ``path`` (module docstring); returns what was written, for the log."""
    import shutil

    import sentencepiece as spm

    path = Path(path)
    if path.suffix == ".json":
        shutil.copy(path, directory / "tokenizer.json")
        if (path.parent / "tokenizer_config.json").is_file():
            shutil.copy(path.parent / "tokenizer_config.json", directory / "tokenizer_config.json")
        shipped = "tokenizer.json (as given)"
    else:
        sp = spm.SentencePieceProcessor(model_file=str(path))
        if own_layout(sp) and not meta.get("added_ids"):
            write_tokenizer(str(path), directory)
            shipped = "tokenizer.json (SentencePiece's ids), tokenizer.model"
        else:
            shutil.copy(path, directory / "tokenizer.model")
            shipped = "tokenizer.model (as given)"
    ids = {"eos": meta.get("eos_id", EOS), "pad": meta.get("pad_id", PAD),
           "bos": meta.get("bos_id", BOS)}
    write_generation_config(cfg, directory, ids)
    if cfg.data.format == "translation" and meta.get("languages"):
        first_added = meta.get("vocab_size", 0) - meta.get("added_ids", 0)
        pieces = {**{lang_tag(lang): i for lang, i in meta.get("lang_ids", {}).items()},
                  SEP: meta.get("sep_id")}
        added = {p: i for p, i in pieces.items() if meta.get("added_ids") and i >= first_added}
        write_readme(directory, meta["languages"], source, added)
    return shipped


def write_tokenizer(sp_model: str, directory: Path) -> None:
    """``tokenizer.json``, ``tokenizer_config.json`` and ``tokenizer.model`` for ``sp_model``."""
    import shutil

    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=sp_model)
    (directory / "tokenizer.json").write_text(json.dumps(tokenizer_json(sp), ensure_ascii=False,
                                                         indent=1) + "\n", encoding="utf-8")
    shutil.copy(sp_model, directory / "tokenizer.model")
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": sp.id_to_piece(BOS),
        "eos_token": sp.id_to_piece(EOS), "unk_token": sp.id_to_piece(UNK),
        "pad_token": sp.id_to_piece(PAD), "add_bos_token": False, "add_eos_token": False,
        "model_max_length": 1_000_000, "clean_up_tokenization_spaces": False},
        indent=2) + "\n")


def write_generation_config(cfg, directory: Path, ids: dict) -> None:
    d = cfg.data
    config = {"eos_token_id": ids["eos"], "pad_token_id": ids["pad"], "bos_token_id": ids["bos"],
              "max_new_tokens": d.max_new_tokens, "do_sample": False,
              "num_beams": d.beam_size}
    if d.beam_size > 1:
        config["length_penalty"] = d.length_penalty
    if d.no_repeat_ngram:
        config["no_repeat_ngram_size"] = d.no_repeat_ngram
    (directory / "generation_config.json").write_text(json.dumps(config, indent=2) + "\n")


def snippet(model_dir: str, lang: str, text: str) -> str:
    """The three lines that translate ``text`` into ``lang`` with ``transformers``."""
    return (f'tok, model = AutoTokenizer.from_pretrained("{model_dir}"), '
            f'AutoModelForCausalLM.from_pretrained("{model_dir}")\n'
            f'ids = tok("{lang_tag(lang)}{text}{SEP}", return_tensors="pt").input_ids\n'
            f'print(tok.decode(model.generate(ids)[0, ids.shape[1]:], skip_special_tokens=True))\n')


def write_readme(directory: Path, languages: list[str], source: str, added: dict) -> None:
    """The export's README: the prompt format, and the three lines that translate with it (or,
    where the data added the special tokens after the tokenizer's vocabulary, their ids)."""
    lang = languages[0] if languages else "de"
    text = (f"# Translation model exported by megatron_moe\n\n"
            f"Exported from `{source}`. A Mixtral-architecture decoder trained on prompts\n"
            f"`<2xx>source text<sep>`, where `xx` is the target language "
            f"({', '.join(languages)}),\ncontinued by the translation and its end token. "
            f"Decoding settings are in\n`generation_config.json`.\n\n")
    if added:
        text += ("The tokenizer lacks the prompt's special tokens; they have these ids (put them "
                 "around the\ntokenized source yourself):\n\n" + "".join(
                     f"- `{piece}`: {i}\n" for piece, i in sorted(added.items())))
    else:
        text += (f"```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
                 f"{snippet('.', lang, 'Open the file.')}```\n")
    (directory / "README.md").write_text(text)
