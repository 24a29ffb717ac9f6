"""Translate with a trained checkpoint and score it: the `evaluate` and `translate` commands'
translation side. Sources become ``<2xx> source <sep>`` prompts with the data directory's tokenizer
(:mod:`megatron_moe.data.text_tokenizers`); hypotheses are decoded greedily or by beam search (see
:mod:`megatron_moe.decoding`)."""

from __future__ import annotations

from megatron_moe.bleu import score
from megatron_moe.data.corpus import DataError
from megatron_moe.data.pairs import Pair, read_pairs
from megatron_moe.data.preprocess import SEP, lang_tag
from megatron_moe.data.text_tokenizers import open_data_tokenizer
from megatron_moe.data.translation import load_meta
from megatron_moe.decoding import Limits, decode


class Translator:
    def __init__(self, run):
        self.run, self.cfg = run, run.cfg
        self.meta = load_meta(self.cfg.data.dir)
        self.tok = open_data_tokenizer(self.cfg.data.dir, self.meta)
        # directories written before meta.json named the ids: the tokenizer's own pieces
        self.lang_ids = self.meta.get("lang_ids") or {
            lang: self.tok.token_id(lang_tag(lang)) for lang in self.meta["languages"]}
        self.sep_id = self.meta.get("sep_id", self.tok.token_id(SEP))

    def prompt(self, lang: str, source: str) -> list[int]:
        if lang not in self.meta["languages"]:
            raise DataError(f"unknown language tag {lang!r} (the model knows: "
                            f"{', '.join(self.meta['languages'])})")
        body = self.tok.encode(source)[: max(1, self.cfg.model.seq_length - 16)]
        return [self.lang_ids[lang]] + body + [self.sep_id]

    def translate(self, items: list[tuple[str, str]], show_progress: bool = False) -> list[str]:
        prompts = [self.prompt(lang, src) for lang, src in items]
        d = self.cfg.data
        limits = Limits(d.max_new_tokens, d.max_length_ratio, d.no_repeat_ngram)
        outputs = decode(self.run.model, prompts, self.meta["eos_id"], self.meta["vocab_size"],
                         limits, batch_size=d.decode_batch_size, beam_size=d.beam_size,
                         length_penalty=d.length_penalty, show_progress=show_progress)
        return [self.tok.decode(ids) for ids in outputs]

    def test_pairs(self, limit=None) -> list[Pair]:
        if self.cfg.data.test_path:
            pairs = read_pairs(self.cfg.data.test_path, languages=set(self.meta["languages"]))
        else:  # the preprocessed test split, references decoded back to text
            from megatron_moe.data.translation import TranslationSamples

            samples = TranslationSamples(self.cfg.data.dir, "test", self.cfg.model.seq_length)
            pairs = []
            for i in range(len(samples)):
                head, tail = samples.pair(i)
                pairs.append(Pair(self.meta["languages"][int(samples.langs[i])],
                                  self.tok.decode(head[1:-1].tolist()),
                                  self.tok.decode(tail[:-1].tolist())))
        return pairs[:limit] if limit else pairs

    def bleu(self, pairs: list[Pair], show_progress: bool = False) -> dict:
        hyps = self.translate([(p.lang, p.src) for p in pairs], show_progress)
        return score([p.lang for p in pairs], hyps, [p.tgt for p in pairs])
