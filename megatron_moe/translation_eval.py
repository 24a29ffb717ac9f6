"""Translate with a trained checkpoint and score it: the `evaluate` and `translate` commands'
translation side. Sources become ``<2xx> source <sep>`` prompts with the directory's SentencePiece
model; hypotheses are decoded greedily or by beam search (see :mod:`megatron_moe.decoding`)."""

from __future__ import annotations

from pathlib import Path

from megatron_moe.bleu import score
from megatron_moe.data.corpus import DataError
from megatron_moe.data.pairs import Pair, read_pairs
from megatron_moe.data.preprocess import EOS, SEP, lang_tag
from megatron_moe.data.translation import load_meta
from megatron_moe.decoding import Limits, decode


class Translator:
    def __init__(self, run):
        import sentencepiece as spm

        self.run, self.cfg = run, run.cfg
        self.meta = load_meta(self.cfg.data.dir)
        self.sp = spm.SentencePieceProcessor(model_file=str(Path(self.cfg.data.dir) / "spm.model"))

    def prompt(self, lang: str, source: str) -> list[int]:
        if lang not in self.meta["languages"]:
            raise DataError(f"unknown language tag {lang!r} (the model knows: "
                            f"{', '.join(self.meta['languages'])})")
        body = self.sp.encode(source)[: max(1, self.cfg.model.seq_length - 16)]
        return [self.sp.piece_to_id(lang_tag(lang))] + body + [self.sp.piece_to_id(SEP)]

    def translate(self, items: list[tuple[str, str]], show_progress: bool = False) -> list[str]:
        prompts = [self.prompt(lang, src) for lang, src in items]
        d = self.cfg.data
        limits = Limits(d.max_new_tokens, d.max_length_ratio, d.no_repeat_ngram)
        outputs = decode(self.run.model, prompts, EOS, self.meta["vocab_size"], limits,
                         batch_size=d.decode_batch_size, beam_size=d.beam_size,
                         length_penalty=d.length_penalty, show_progress=show_progress)
        return [self.sp.decode(ids) for ids in outputs]

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
                                  self.sp.decode(head[1:-1].tolist()),
                                  self.sp.decode(tail[:-1].tolist())))
        return pairs[:limit] if limit else pairs

    def bleu(self, pairs: list[Pair], show_progress: bool = False) -> dict:
        hyps = self.translate([(p.lang, p.src) for p in pairs], show_progress)
        return score([p.lang for p in pairs], hyps, [p.tgt for p in pairs])
