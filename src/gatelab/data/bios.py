"""Synthetic biographies (bioS) and the bits-of-knowledge measure, at small scale.

"Physics of Language Models: Part 3.3, Knowledge Capacity Scaling Laws" (Allen-Zhu & Li,
arXiv 2404.05405, ICLR 2025). bioS(N): N people, each with a unique random name and six
attributes (birth date, birth city, university, major, employer, employer city, the last
a function of the employer), each rendered as one templated sentence; a language model is
pretrained on these texts from scratch and its stored knowledge measured in bits.

Our generator, and where it departs from the paper:

- Words are tokens: a name is three tokens (first, middle, last) drawn from pools of
  ``first`` x ``middle`` x ``last`` parts (the paper's pools are recalled as 400 / 400 /
  1000), so N0 = first * middle * last possible names; each value of an attribute is one
  token (a birth date three: month, day, year). Names are unique per person.
- Value sets are finite and uniform, with sizes in :class:`BioSpec`. The defaults are
  smaller than the paper's (recalled: 12 * 28 * 200 dates, 200 cities, 300 universities,
  100 majors, 263 companies) so that a small model's vocabulary stays small.
- Three templates per attribute (the paper has about 50), chosen at random on every
  exposure; every sentence names the person in full; the six sentences keep one order
  (the paper also permutes them in some variants).

Bits (:func:`knowledge_bits`): our reading of the paper's lower bound for bioS, with the
model's losses measured on the training biographies,

    bits = N * log2(N0 / e^p1) + N * sum_i log2(|D_i| / e^p2_i)

where p1 is the mean (over people) cross entropy in nats of the three name tokens that
open a biography, and p2_i the mean cross entropy of attribute i's value tokens. A model
that knows nothing (uniform over names and values) scores 0; one that knows the name set
and every value scores N log2(N0 / N) + N sum_i log2 |D_i|. Employer city is left out
of the sum because it is a function of the employer (it adds no information). The notes
mark the formula as recalled; we take it as written there and do not clamp the terms, so
a model worse than uniform on a term scores negative bits on it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["ATTRIBUTES", "BioSpec", "Bios", "bios", "knowledge_bits"]

BOS, EOS, PAD = "<bos>", "<eos>", "<pad>"

# attribute -> the value-set fields of BioSpec its value tokens come from
ATTRIBUTES = {
    "birth_date": ("month", "day", "year"),
    "birth_city": ("city",),
    "university": ("university",),
    "major": ("major",),
    "employer": ("company",),
    "employer_city": ("city",),
}
# the attributes counted in the bits measure (employer city is a function of the employer)
INFORMATIVE = ("birth_date", "birth_city", "university", "major", "employer")

TEMPLATES = {
    "birth_date": (
        "{n} was born on {v} .",
        "{n} came into this world on {v} .",
        "{n} celebrates the birthday on {v} .",
    ),
    "birth_city": (
        "{n} was born in {v} .",
        "{n} spent the early years in {v} .",
        "{n} hails from {v} .",
    ),
    "university": (
        "{n} studied at {v} .",
        "{n} graduated from {v} .",
        "{n} received an education at {v} .",
    ),
    "major": (
        "{n} majored in {v} .",
        "{n} focused on {v} studies .",
        "{n} completed a degree in {v} .",
    ),
    "employer": ("{n} worked for {v} .", "{n} was employed at {v} .", "{n} had a career at {v} ."),
    "employer_city": (
        "{n} worked in {v} .",
        "{n} was based in {v} .",
        "{n} lived in {v} for work .",
    ),
}


@dataclass(frozen=True)
class BioSpec:
    """Pool and value-set sizes (our small-scale defaults; see the module docstring)."""

    first: int = 40
    middle: int = 20
    last: int = 100
    month: int = 12
    day: int = 28
    year: int = 50
    city: int = 100
    university: int = 100
    major: int = 50
    company: int = 100

    @property
    def num_names(self) -> int:
        """N0: the number of possible names."""
        return self.first * self.middle * self.last

    def domain_size(self, attribute: str) -> int:
        """|D_i|: the number of possible values of an attribute."""
        return math.prod(getattr(self, part) for part in ATTRIBUTES[attribute])


@dataclass
class Bios:
    """N people: ``names`` [N, 3] and ``values`` (attribute -> [N, parts]) as token ids.

    ``vocab`` lists the tokens (``token_id`` maps back), ``company_city`` [company] the
    city of each company. :meth:`render` writes biographies as token ids and records
    where each name and value sits, which :func:`knowledge_bits` reads.
    """

    spec: BioSpec
    vocab: list[str]
    names: Tensor
    values: dict[str, Tensor]
    company_city: Tensor

    def __post_init__(self):
        self.token_id = {t: i for i, t in enumerate(self.vocab)}

    def __len__(self) -> int:
        return self.names.shape[0]

    @property
    def pad_id(self) -> int:
        return self.token_id[PAD]

    def render(self, people: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor, dict]:
        """Biographies of ``people`` with random templates.

        Returns ids [B, L] (right-padded with PAD), mask [B, L] (True on real tokens) and
        spans: "name" and each attribute -> [B, 2] (start, end) of its value tokens in the
        first sentence that states it (the name's first occurrence for "name").
        """
        rows, spans = [], {key: [] for key in ("name", *ATTRIBUTES)}
        choice = torch.randint(0, 3, (len(people), len(ATTRIBUTES)), generator=generator)
        for b, person in enumerate(people.tolist()):
            ids = [self.token_id[BOS]]
            name = self.names[person].tolist()
            for a, attribute in enumerate(ATTRIBUTES):
                template = TEMPLATES[attribute][int(choice[b, a])]
                for word in template.split():
                    if word == "{n}":
                        if a == 0:
                            spans["name"].append((len(ids), len(ids) + 3))
                        ids += name
                    elif word == "{v}":
                        value = self.values[attribute][person].tolist()
                        spans[attribute].append((len(ids), len(ids) + len(value)))
                        ids += value
                    else:
                        ids.append(self.token_id[word])
            rows.append(ids + [self.token_id[EOS]])
        length = max(len(r) for r in rows)
        ids = torch.full((len(rows), length), self.pad_id, dtype=torch.int64)
        for b, r in enumerate(rows):
            ids[b, : len(r)] = torch.tensor(r)
        return ids, ids != self.pad_id, {k: torch.tensor(v) for k, v in spans.items()}


def _vocabulary(spec: BioSpec) -> list[str]:
    words = sorted({w for ts in TEMPLATES.values() for t in ts for w in t.split()} - {"{n}", "{v}"})
    pools = [
        f"{kind}_{i}" for kind in ("first", "middle", "last") for i in range(getattr(spec, kind))
    ]
    sets = ("month", "day", "year", "city", "university", "major", "company")
    values = [f"{kind}_{i}" for kind in sets for i in range(getattr(spec, kind))]
    return [PAD, BOS, EOS, *words, *pools, *values]


def bios(num_people: int, spec: BioSpec | None = None, seed: int = 0) -> Bios:
    """bioS(N) people: unique uniform names, uniform independent attribute values."""
    spec = spec or BioSpec()
    for field in spec.__dataclass_fields__:
        value = getattr(spec, field)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"BioSpec.{field} must be a positive int, got {value!r}")
    if not isinstance(num_people, int) or not 1 <= num_people <= spec.num_names:
        raise ValueError(
            f"num_people must be an int in [1, N0={spec.num_names}] (unique names), got "
            f"{num_people!r}; raise BioSpec.first/middle/last for more people"
        )
    vocab = _vocabulary(spec)
    tid = {t: i for i, t in enumerate(vocab)}
    gen = torch.Generator().manual_seed(seed)
    flat = torch.randperm(spec.num_names, generator=gen)[:num_people]  # unique names
    parts = torch.stack(
        [flat // (spec.middle * spec.last), flat // spec.last % spec.middle, flat % spec.last], 1
    )
    names = torch.stack(
        [_ids(tid, kind, parts[:, i]) for i, kind in enumerate(("first", "middle", "last"))], 1
    )
    company_city = torch.randint(0, spec.city, (spec.company,), generator=gen)
    draws = {
        k: torch.randint(0, getattr(spec, k), (num_people,), generator=gen)
        for k in ("month", "day", "year", "city", "university", "major", "company")
    }
    values = {
        attribute: torch.stack([_ids(tid, kind, draws[kind]) for kind in kinds], 1)
        for attribute, kinds in ATTRIBUTES.items()
        if attribute != "employer_city"
    }
    values["employer_city"] = _ids(tid, "city", company_city[draws["company"]])[:, None]
    return Bios(spec, vocab, names, values, company_city)


def _ids(tid: dict[str, int], kind: str, index: Tensor) -> Tensor:
    return torch.tensor([tid[f"{kind}_{i}"] for i in index.tolist()], dtype=torch.int64)


def span_losses(logits: Tensor, ids: Tensor, spans: dict[str, Tensor]) -> dict[str, Tensor]:
    """Per-person summed cross entropy (nats) of each span's tokens, [B] per key.

    ``logits`` [B, L, V] predict ids shifted by one: token j is scored by logits[:, j-1].
    """
    logp = logits.float().log_softmax(-1)
    out = {}
    for key, span in spans.items():
        total = torch.zeros(ids.shape[0])
        for offset in range(int((span[:, 1] - span[:, 0]).max())):
            pos = span[:, 0] + offset
            inside = pos < span[:, 1]
            rows = torch.arange(ids.shape[0])
            lp = logp[rows, (pos - 1).clamp_min(0), ids[rows, pos.clamp_max(ids.shape[1] - 1)]]
            total -= torch.where(inside, lp, torch.zeros_like(lp))
        out[key] = total
    return out


def knowledge_bits(data: Bios, losses: dict[str, float]) -> dict[str, float]:
    """The bits lower bound from mean per-person losses in nats ("name" and attributes).

    Returns each term (``name`` and each informative attribute, in bits over all N
    people) and their ``total``; see the module docstring for the formula.
    """
    n, spec, ln2 = len(data), data.spec, math.log(2)
    missing = [k for k in ("name", *INFORMATIVE) if k not in losses]
    if missing:
        raise ValueError(f"knowledge_bits: losses lacks {missing}; pass span_losses' means")
    terms = {"name": n * (math.log2(spec.num_names) - losses["name"] / ln2)}
    for attribute in INFORMATIVE:
        terms[attribute] = n * (math.log2(spec.domain_size(attribute)) - losses[attribute] / ln2)
    terms["total"] = sum(terms.values())
    return terms
