"""`glmc run`: GLM-130B's generate.py, on any backend."""

from __future__ import annotations

import json
import os
import sys
from datetime import datetime
from pathlib import Path

import click

from glmc.cli import cli
from glmc.cli.model_options import model_options, open_model
from glmc.cli.types import SEED, finite
from glmc.errors import GlmcError, PromptError
from glmc.fileio import read_text, write_text_atomic

QUERY_PROMPT = "\nPlease Input Query (stop to exit) >>> "


@cli.command(context_settings={"show_default": True})
@click.argument("prompts", nargs=-1)
@model_options
@click.option("--token-ids", is_flag=True,
              help="Prompts are token ids separated by spaces, masks written as [MASK], [sMASK], [gMASK] "
                   "(for checkpoints without a tokenizer).")
@click.option("--input-source", metavar="interactive|FILE",
              help="Read prompts from FILE (one per line) or interactively. Default: interactive when "
                   "no PROMPTS are given.", show_default=False)
@click.option("--with-id", is_flag=True, help="Input lines are 'id<TAB>text'; output goes to <id>.txt.")
@click.option("--output-path", type=click.Path(file_okay=False, path_type=Path), default=Path("samples"),
              help="Folder for one .txt file per prompt (every answer on its own line).")
@click.option("--no-output-files", is_flag=True, help="Do not write the per-prompt files.")
@click.option("--out-seq-length", type=click.IntRange(min=2), default=256,
              help="Total length of context plus generated blank.")
@click.option("--min-gen-length", type=click.IntRange(min=0), default=0,
              help="Hold end tokens back until this many tokens of the blank are generated.")
@click.option("--sampling-strategy", type=click.Choice(["BaseStrategy", "BeamSearchStrategy"]),
              default="BaseStrategy", help="Sampling (temperature/top-k/top-p) or beam search.")
@click.option("--temperature", type=finite(0, min_open=True), default=1.0)
@click.option("--top-k", "--top_k", "top_k", type=click.IntRange(min=0), default=0,
              help="Keep the k most likely tokens (0: no limit; 1: greedy).")
@click.option("--top-p", "--top_p", "top_p", type=finite(0, 1), default=0.7,
              help="Keep the smallest set of tokens whose probability reaches p (0: off).")
@click.option("--num-beams", type=click.IntRange(min=1), default=4)
@click.option("--length-penalty", type=finite(), default=1.0,
              help="Beam score / ((5 + length) / 6) ** penalty, length counting the context.")
@click.option("--no-repeat-ngram-size", type=click.IntRange(min=0), default=3,
              help="Beam search never repeats an n-gram of this size (0: off).")
@click.option("--beam-sampling", is_flag=True,
              help="Draw beam candidates at random, as GLM-130B's generate.py does; default: the "
                   "deterministic top candidates, as its evaluation does.")
@click.option("--print-all-beams", is_flag=True, help="Print every beam, not only the best.")
@click.option("--batch-size", type=click.IntRange(min=1), default=1, help="Prompts generated together.")
@click.option("--seed", type=SEED, default=1234, help="Seed of the sampling generator.")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object per prompt (input, answers, blanks, token ids, scores) "
                   "instead of text.")
def run(prompts, model, token_ids, input_source, with_id, output_path, no_output_files, out_seq_length,
        min_gen_length, sampling_strategy, temperature, top_k, top_p, num_beams, length_penalty,
        no_repeat_ngram_size, beam_sampling, print_all_beams, batch_size, seed, as_json):
    """Fill the blanks of PROMPTS, GLM-130B style.

    A prompt may hold [MASK] (a short blank), [sMASK] (a sentence) or [gMASK] (a long
    continuation); without any, [gMASK] is appended. Masks are filled left to right.
    With no checkpoint the small embedded model runs (one layer trained by `glmc
    train` on English quotations and Chinese poems: words of its corpus, not sense).

    \b
    Examples:
      glmc run "The best way to learn is [gMASK]" "春眠不觉晓，[gMASK]"
      glmc run --checkpoint CKPT --sampling-strategy BeamSearchStrategy "Who is Turing? [gMASK]"
      glmc run --checkpoint CKPT --input-source prompts.txt --with-id --output-path out/
      glmc run --package PKG --backend onnxruntime "GLM-130B is [MASK]."
    """
    from glmc.generation.strategies import BaseStrategy, BeamSearchStrategy

    if prompts and input_source:
        raise click.UsageError("give PROMPTS or --input-source, not both")
    if with_id and not (input_source and input_source != "interactive"):
        raise click.UsageError("--with-id reads 'id<TAB>text' lines from --input-source FILE")
    if sampling_strategy == "BeamSearchStrategy":
        strategy = BeamSearchStrategy(num_beams, length_penalty, no_repeat_ngram_size=no_repeat_ngram_size,
                                      min_gen_length=min_gen_length, deterministic=not beam_sampling, seed=seed)
    else:
        strategy = BaseStrategy(temperature, top_k, top_p, min_gen_length=min_gen_length, seed=seed)

    glm = open_model(model)
    if glm is None:  # a torchrun rank other than 0: it served rank 0 until the end
        return
    with glm:
        _run_prompts(glm, strategy, prompts, input_source, with_id, batch_size, out_seq_length,
                     as_json, print_all_beams, None if no_output_files else output_path, token_ids)


def _ids(text: str, special) -> list[int]:
    """ "17 345 [MASK] 66" -> [17, 345, <[MASK] id>, 66]."""
    out = []
    for word in text.split():
        if word in ("[MASK]", "[sMASK]", "[gMASK]"):
            out.append(special.command(word))
        elif word.lstrip("-").isdigit():
            out.append(int(word))
        else:
            raise GlmcError(f"--token-ids: {word!r} is neither a token id nor a mask")
    return out


def _run_prompts(model, strategy, prompts, input_source, with_id, batch_size, out_seq_length, as_json,
                 print_all_beams, output_path, token_ids=False):
    writer = _Writer(output_path, as_json, print_all_beams)

    def generate(items: list[tuple[str | None, str]], stream: bool = False) -> None:
        on_step = _Streamer(model) if stream and strategy.num_beams == 1 and not as_json else None
        inputs = [_ids(text, model.special_tokens()) if token_ids else text for _, text in items]
        results = model.generate(inputs, strategy, out_seq_length=out_seq_length, on_step=on_step)
        for (query_id, text), result in zip(items, results):
            writer.emit(query_id, text, result, streamed=on_step is not None)

    if prompts:
        for start in range(0, len(prompts), batch_size):
            generate([(None, p) for p in prompts[start:start + batch_size]])
    elif input_source and input_source != "interactive":
        items = _read_input_file(Path(input_source), with_id)
        for start in range(0, len(items), batch_size):
            generate(items[start:start + batch_size])
    else:
        _interactive(lambda text: generate([(None, text)], stream=True))


def _read_input_file(path: Path, with_id: bool) -> list[tuple[str | None, str]]:
    lines = read_text(path, label="--input-source ").splitlines()
    items = []
    for number, line in enumerate(lines, start=1):
        line = line.strip()
        if not line:
            continue
        if with_id:
            if "\t" not in line:
                raise GlmcError(f"{path}:{number}: --with-id expects 'id<TAB>text'")
            query_id, line = line.split("\t", 1)
            if not query_id or "/" in query_id or query_id in (".", ".."):
                raise GlmcError(f"{path}:{number}: id {query_id!r} cannot name an output file")
            items.append((query_id, line))
        else:
            items.append((None, line))
    return items


def _interactive(process) -> None:
    while True:
        try:
            text = input(QUERY_PROMPT).strip()
        except EOFError:
            click.echo()
            return
        if not text:
            click.echo("Query should not be empty!")
            continue
        if text == "stop":
            return
        try:
            process(text)
        except PromptError as error:  # as GLM-130B: report and ask again
            click.echo(f"glmc: error: {error}", err=True)


class _Streamer:
    """Prints the blank of a single prompt as its tokens come."""

    def __init__(self, model):
        self.model, self.printed = model, ""

    def __call__(self, row: int, blank: list[int]) -> None:
        if row != 0 or self.model.tokenizer is None:
            return
        if len(blank) == 1 and self.printed:  # the next blank begins
            click.echo()
            self.printed = ""
        ends = self.model.special.end_tokens
        text = self.model.tokenizer.detokenize([t for t in blank if t >= 0 and t not in ends])
        if text.startswith(self.printed):  # a piece may change how earlier ones decode
            click.echo(text[len(self.printed):], nl=False)
            sys.stdout.flush()
            self.printed = text


class _Writer:
    """GLM-130B's outputs: 'Output: ...' on stdout and one file per prompt."""

    def __init__(self, output_path: Path | None, as_json: bool, print_all_beams: bool):
        self.output_path, self.as_json, self.print_all_beams = output_path, as_json, print_all_beams
        self.ansi = sys.stdout.isatty() and not os.environ.get("NO_COLOR")

    def emit(self, query_id: str | None, text: str, result, streamed: bool = False) -> None:
        path = self._write_file(query_id, text, result) if self.output_path else None
        if self.as_json:
            click.echo(json.dumps({
                "id": query_id, "input": result.input_text, "answers": result.answers,
                "blanks": result.blanks, "token_ids": result.token_ids, "blank_ids": result.blank_ids,
                "scores": result.scores, "file": str(path) if path else None,
            }, ensure_ascii=False))
            return
        if streamed:
            click.echo()
        click.echo(f"\nInput: {result.input_text if result.input_text is not None else text}\n")
        if result.answers is None:
            click.echo(f"Output: {' '.join(map(str, result.token_ids[0]))}")
        elif self.print_all_beams and len(result.answers) > 1:
            for index in range(len(result.answers)):
                click.echo(f"Output beam {index}: {result.styled(index, self.ansi)}")
        else:
            click.echo(f"Output: {result.styled(0, self.ansi)}")

    def _write_file(self, query_id: str | None, text: str, result) -> Path:
        self.output_path.mkdir(parents=True, exist_ok=True)
        if query_id is not None:
            path = self.output_path / f"{query_id}.txt"
        else:
            stem = f"{text.replace('/', '')[:20]}-{datetime.now().strftime('%m-%d-%H-%M-%S')}"
            path, n = self.output_path / f"{stem}.txt", 1
            while path.exists():  # two prompts in one second must not overwrite each other
                path, n = self.output_path / f"{stem}-{n}.txt", n + 1
        lines = result.answers if result.answers is not None else [" ".join(map(str, t)) for t in result.token_ids]
        write_text_atomic(path, "".join(line + "\n" for line in lines))
        return path
