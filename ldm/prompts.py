"""Prompt syntax as AUTOMATIC1111's web UI reads it: pure text processing, no model.

- Emphasis (``parse_attention``): ``(word)`` multiplies the attention to its tokens by 1.1, ``((word))``
  by 1.1^2, ``[word]`` divides by 1.1, ``(word:1.3)`` sets 1.3 (multiplying any enclosing weight),
  ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\`` are literal characters, an unclosed bracket runs to the end,
  and ``BREAK`` (capitals) ends the current chunk of tokens.
- Chunks (``chunk_tokens``): a prompt longer than the encoder's context is split into chunks of
  ``context - 2`` tokens, each encoded with its own start and end tokens; a chunk that fills up moves
  the words after its last comma (if within 20 tokens) into the next chunk, as A1111 does.
- Prompt editing and alternation (``prompt_schedule``): ``[from:to:when]`` switches from ``from`` to
  ``to`` after step ``when`` (a number with a point is a fraction of the steps, an integer a step),
  ``[to:when]`` adds ``to`` after it, ``[from::when]`` removes ``from``; ``[a|b|c]`` alternates
  every step.
- Extra networks (``lora_tags``): ``<lora:NAME:WEIGHT>`` (or ``<lora:NAME:TE:UNET>``, ``te=`` / ``unet=``
  named) applies a LoRA file at that weight and is removed from the text the encoder reads, before
  anything else is parsed (A1111's ``extra_networks.parse_prompt``); ``<lyco:...>`` is the same.
"""

from __future__ import annotations

import math
import re

BREAK = ("BREAK", -1.0)
COMMA_BACKTRACK = 20  # A1111's comma_padding_backtrack default

_ATTENTION = re.compile(r"""
\\\(|\\\)|\\\[|\\]|\\\\|\\|   # escapes and a lone backslash
\(|\[|                        # openers
:\s*([+-]?[.\d]+)\s*\)|       # (text:weight) closer
\)|]|                         # closers
[^\\()\[\]:]+|                # text
:
""", re.X)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
_EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")  # A1111's re_extra_net
LORA_TYPES = ("lora", "lyco")  # tag types read as LoRA files (A1111 reads lyco tags with its LoRA code)


def strip_extra_networks(prompt: str) -> str:
    """The prompt without its ``<type:args>`` tags: the text the encoder reads."""
    return _EXTRA_NETWORK.sub("", prompt) if "<" in prompt else prompt


def lora_tags(prompt: str) -> list[tuple[str, float, float]]:
    """The LoRA tags of a prompt as (name, text-encoder weight, U-Net weight), in order, read as A1111's
    LoRA code reads ``<lora:NAME[:TE[:UNET]]>`` (``te=`` and ``unet=`` named; the U-Net's weight is the
    text encoder's unless given; ``dyn=`` is accepted and ignored). Raises ValueError naming the tag
    for a weight that is not a number or a tag of a type other than LoRA (hypernetworks are not
    supported)."""
    out = []
    for m in _EXTRA_NETWORK.finditer(prompt):
        kind, args = m.group(1), m.group(2).split(":")
        if kind not in LORA_TYPES:
            raise ValueError(f"{m.group(0)}: extra networks of type {kind!r} are not supported; LoRA is, as "
                             "<lora:NAME:WEIGHT>")
        positional = [a for a in args if "=" not in a]
        named = dict(a.split("=", 1) for a in args if "=" in a)
        unknown = sorted(set(named) - {"te", "unet", "dyn"})
        if unknown or not positional or not positional[0].strip():
            raise ValueError(f"{m.group(0)}: write <lora:NAME:WEIGHT> (or <lora:NAME:TE:UNET>)"
                             + (f"; {', '.join(unknown)}= is not a LoRA argument" if unknown else ""))
        try:
            te = float(named.get("te", positional[1] if len(positional) > 1 else 1.0))
            unet = float(named.get("unet", positional[2] if len(positional) > 2 else te))
        except ValueError:
            raise ValueError(f"{m.group(0)}: a LoRA's weight is a number, as in <lora:{positional[0]}:0.8>") from None
        if not (math.isfinite(te) and math.isfinite(unet)):
            raise ValueError(f"{m.group(0)}: a LoRA's weight must be finite")
        out.append((positional[0].strip(), te, unet))
    return out


def parse_attention(text: str) -> list[tuple[str, float]]:
    """``text`` as (piece, weight) pairs, adjacent pieces of equal weight merged; ``BREAK`` is the
    pair ("BREAK", -1). Weights multiply through nesting; unclosed brackets close at the end."""
    res: list[list] = []
    round_open, square_open = [], []

    def multiply(start: int, factor: float):
        for p in range(start, len(res)):
            res[p][1] *= factor

    for m in _ATTENTION.finditer(text):
        piece, weight = m.group(0), m.group(1)
        if piece.startswith("\\") and len(piece) == 2:
            res.append([piece[1:], 1.0])
        elif piece == "(":
            round_open.append(len(res))
        elif piece == "[":
            square_open.append(len(res))
        elif weight is not None and round_open:
            multiply(round_open.pop(), float(weight))
        elif piece == ")" and round_open:
            multiply(round_open.pop(), 1.1)
        elif piece == "]" and square_open:
            multiply(square_open.pop(), 1 / 1.1)
        else:
            for i, part in enumerate(_BREAK.split(piece)):
                if i > 0:
                    res.append(list(BREAK))
                res.append([part, 1.0])
    for pos in round_open:
        multiply(pos, 1.1)
    for pos in square_open:
        multiply(pos, 1 / 1.1)
    if not res:
        res = [["", 1.0]]
    i = 0
    while i + 1 < len(res):  # merge runs of equal weight
        if res[i][1] == res[i + 1][1] and res[i][1] != -1:
            res[i][0] += res[i + 1][0]
            res.pop(i + 1)
        else:
            i += 1
    return [(t, w) for t, w in res]


def chunk_tokens(pieces: list[tuple[list[int], float]], chunk_length: int,
                 comma: int | None) -> list[tuple[list[int], list[float]]]:
    """Split tokenised pieces (ids, weight) into chunks of at most ``chunk_length`` tokens with one
    weight per token (start and end tokens not included). A BREAK piece (weight -1) ends a chunk; a
    full chunk whose last comma is at most 20 tokens back hands the tokens after it to the next."""
    chunks: list[tuple[list[int], list[float]]] = []
    tokens: list[int] = []
    weights: list[float] = []
    last_comma = -1

    def close():
        nonlocal tokens, weights, last_comma
        chunks.append((tokens, weights))
        tokens, weights, last_comma = [], [], -1

    for ids, weight in pieces:
        if weight == -1:
            close()
            continue
        for tok in ids:
            if tok == comma:
                last_comma = len(tokens)
            elif len(tokens) == chunk_length and last_comma != -1 and len(tokens) - last_comma <= COMMA_BACKTRACK:
                cut = last_comma + 1
                moved = tokens[cut:], weights[cut:]
                tokens, weights = tokens[:cut], weights[:cut]
                close()
                tokens, weights = list(moved[0]), list(moved[1])
            if len(tokens) == chunk_length:
                close()
            tokens.append(tok)
            weights.append(weight)
    if tokens or not chunks:
        close()
    return chunks


# --- prompt editing and alternation ----------------------------------------------------------------

class _Parser:
    """A recursive-descent reading of A1111's prompt grammar:
        prompt    := (group | plain)*   (a bracket that opens no valid group is a character)
        group     := "(" prompt [":" prompt] ")" | "[" prompt "]"              (emphasis, kept as text)
                   | "[" [prompt ":"] prompt ":" NUMBER "]"                     (scheduled)
                   | "[" prompt ("|" prompt)+ "]"                               (alternate)
    Nodes: str, ("seq", [nodes]), ("sched", before, after, when), ("alt", [nodes])."""

    def __init__(self, text: str):
        self.s, self.i = text, 0

    def error(self):
        raise ValueError(f"no bracket group at {self.i} in {self.s!r}")

    def prompt(self, stops: str) -> tuple:
        """Nodes up to (not including) an unescaped character of ``stops`` at this level."""
        nodes = []
        buf = []
        while self.i < len(self.s):
            c = self.s[self.i]
            if c == "\\" and self.i + 1 < len(self.s):
                buf.append(self.s[self.i:self.i + 2])
                self.i += 2
            elif c in stops:
                break
            elif c in "([":
                start = self.i
                try:
                    group = self.group()
                except ValueError:  # not a group: the bracket is a character (A1111's start rule)
                    self.i = start + 1
                    buf.append(c)
                    continue
                if buf:
                    nodes.append("".join(buf))
                    buf = []
                nodes.append(group)
            else:  # text, and closing brackets that close nothing
                buf.append(c)
                self.i += 1
        if buf:
            nodes.append("".join(buf))
        return ("seq", nodes)

    def group(self):
        opener = self.s[self.i]
        self.i += 1
        if opener == "(":
            inner = self.prompt("):")
            parts = [inner]
            if self.i < len(self.s) and self.s[self.i] == ":":
                self.i += 1
                parts += [":", self.prompt(")")]
            if self.i >= len(self.s):
                self.error()
            self.i += 1
            return ("seq", ["("] + parts + [")"])
        parts, seps = [self.prompt(":|]")], []
        while self.i < len(self.s) and self.s[self.i] in ":|":
            seps.append(self.s[self.i])
            self.i += 1
            parts.append(self.prompt(":|]"))
        if self.i >= len(self.s):
            self.error()
        self.i += 1
        if seps and all(s == "|" for s in seps):
            return ("alt", parts)
        if seps and all(s == ":" for s in seps) and len(parts) in (2, 3):
            when = _text(parts[-1], 0, {}).strip()
            if re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)", when):
                before, after = (parts[0], parts[1]) if len(parts) == 3 else (("seq", []), parts[0])
                return ("sched", before, after, when)
        if seps:  # neither a schedule nor an alternation
            self.error()
        return ("seq", ["["] + parts + ["]"])


def _when(when: str, steps: int, base_steps: int | None = None) -> int:
    """The step after which ``[from:to:when]`` switches, over ``steps``; in a hires pass (``base_steps``, the
    first pass's steps) the first pass counts first, as A1111 counts: a fraction f is (f - 1) x steps
    (so 0.5 was over before the pass, 1.5 is its middle), an integer n is n - base_steps."""
    v = float(when)
    if base_steps is not None:
        return min(steps, int((v - 1.0) * steps if "." in when else v - base_steps))
    return min(steps, int(v * steps if "." in when else v))


def _collect(node, steps: int, out: set, base_steps: int | None = None):
    if isinstance(node, str):
        return
    if node[0] == "sched":
        w = _when(node[3], steps, base_steps)
        if w >= 1:
            out.add(w)
        _collect(node[1], steps, out, base_steps)
        _collect(node[2], steps, out, base_steps)
    elif node[0] == "alt":
        out.update(range(1, steps + 1))
        for n in node[1]:
            _collect(n, steps, out, base_steps)
    else:
        for n in node[1]:
            _collect(n, steps, out, base_steps)


def _text(node, step: int, whens: dict) -> str:
    if isinstance(node, str):
        return node
    if node[0] == "sched":
        return _text(node[1] if step <= whens.get(id(node), 0) else node[2], step, whens)
    if node[0] == "alt":
        return _text(node[1][(step - 1) % len(node[1])], step, whens)
    return "".join(_text(n, step, whens) for n in node[1])


def prompt_schedule(prompt: str, steps: int, base_steps: int | None = None) -> list[tuple[int, str]]:
    """[(end_at_step, text)]: the prompt's text up to and including each step (steps count from 1),
    A1111's ``get_learned_conditioning_prompt_schedules``. A prompt without editing is [(steps,
    prompt)]; brackets that form no group are kept as characters. Extra-network tags are removed
    first. ``base_steps``: this is a hires pass of ``steps`` after a first pass of that many (``_when``)."""
    prompt = strip_extra_networks(prompt)
    if "[" not in prompt:
        return [(steps, prompt)]
    tree = _Parser(prompt).prompt("")
    bounds = {steps}
    _collect(tree, steps, bounds, base_steps)
    whens: dict = {}

    def mark(node):
        if isinstance(node, str):
            return
        if node[0] == "sched":
            whens[id(node)] = _when(node[3], steps, base_steps)
            mark(node[1])
            mark(node[2])
        else:
            for n in node[1]:
                mark(n)

    mark(tree)
    return [(t, _text(tree, t, whens)) for t in sorted(bounds)]


def text_at(schedule: list[tuple[int, str]], step: int) -> int:
    """The index of the schedule entry in force at sampler step ``step`` (0-based, as A1111 counts:
    the first entry whose end_at_step >= step)."""
    return next((i for i, (end, _) in enumerate(schedule) if step <= end), 0)
