"""BLEU and chrF per language and overall, with sacrebleu.

Tokenisation for BLEU: sacrebleu's ``zh`` tokenizer for Chinese, ``char`` for Japanese (no MeCab
here: character-level BLEU), ``13a`` for every other language. chrF needs none. The choice is
reported with the scores.
"""

from __future__ import annotations

from collections import defaultdict

import sacrebleu


def bleu_tokenizer(lang: str) -> str:
    if lang.startswith("zh"):
        return "zh"
    if lang == "ja":
        return "char"
    return "13a"


def score(langs: list[str], hypotheses: list[str], references: list[str]) -> dict:
    groups = defaultdict(lambda: ([], []))
    for lang, hyp, ref in zip(langs, hypotheses, references):
        groups[lang][0].append(hyp)
        groups[lang][1].append(ref)
    per_language = {}
    for lang in sorted(groups):
        hyps, refs = groups[lang]
        per_language[lang] = {
            "bleu": round(sacrebleu.corpus_bleu(hyps, [refs], tokenize=bleu_tokenizer(lang)).score, 2),
            "chrf": round(sacrebleu.corpus_chrf(hyps, [refs]).score, 2),
            "pairs": len(hyps),
            "bleu_tokenize": bleu_tokenizer(lang),
        }
    overall_bleu = sum(v["bleu"] for v in per_language.values()) / max(len(per_language), 1)
    overall_chrf = sacrebleu.corpus_chrf(hypotheses, [references]).score
    return {"bleu": round(overall_bleu, 2), "chrf": round(overall_chrf, 2),
            "per_language": per_language}


def format_table(result: dict) -> str:
    lines = [f"{'lang':<6} {'pairs':>6} {'BLEU':>6} {'chrF':>6}  BLEU tokenize"]
    for lang, v in result["per_language"].items():
        lines.append(f"{lang:<6} {v['pairs']:>6} {v['bleu']:>6.2f} {v['chrf']:>6.2f}  "
                     f"{v['bleu_tokenize']}")
    lines.append(f"{'all':<6} {sum(v['pairs'] for v in result['per_language'].values()):>6} "
                 f"{result['bleu']:>6.2f} {result['chrf']:>6.2f}  (BLEU: mean over languages; "
                 f"chrF: corpus)")
    return "\n".join(lines)
