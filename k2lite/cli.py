"""`k2lite` command line: generate, chat, info, bench, perplexity, convert, serve, download. A click wrapper over the library
API (generate.py, info.py); errors print one `error: ...` line and exit 2."""
from __future__ import annotations

import json
import os
import statistics
import sys

import click

DEFAULT_PROMPT = "It is a truth universally acknowledged"


class Group(click.Group):
    """Turns every expected failure (bad args, bad model folder) into `error: ...`, exit 2 (as click usage errors do)."""

    def main(self, args=None, prog_name=None, **kw):
        kw.pop("standalone_mode", None)
        try:
            rc = super().main(args, prog_name or "k2lite", standalone_mode=False, **kw)
        except click.exceptions.Abort:
            click.echo("", err=True)
            sys.exit(130)
        except click.ClickException as e:
            click.echo(f"error: {e.format_message()}", err=True)
            sys.exit(2)
        except (ValueError, OSError, RuntimeError, KeyError) as e:   # ModelFormatError is a ValueError
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        sys.exit(rc if isinstance(rc, int) else 0)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """k2lite: a small, readable inference engine for Kimi K2 (DeepSeek-V3 architecture)."""


WEIGHTS = click.option(
    "--weights", type=click.Choice(["mmap", "load", "repack"]), default="mmap", show_default=True,
    help="mmap: map the checkpoint (instant, shared with the page cache); load: copy into "
         "anonymous memory; repack: map, but copy BF16 linear weights into 16-row tiles "
         "(fastest decode, costs their size in RAM).")


KV_CACHE = click.option(
    "--kv-cache", type=click.Choice(["bf16", "int8", "f32"]), default=None,
    help="Latent KV cache type (default: bf16 where the CPU has AVX512-BF16, else f32); int8 "
         "halves bf16's memory and is the fastest attention at long context.")


def model_options(f):
    f = KV_CACHE(f)
    f = WEIGHTS(f)
    f = click.option("--threads", "-t", type=click.IntRange(1), help="CPU threads for the kernels (default: physical cores, or OMP_NUM_THREADS).")(f)
    f = click.option("--device", type=click.Choice(["cpu", "cuda", "ref"]), default="cpu", show_default=True)(f)
    return click.option("--model", "-m", "model", help="Checkpoint folder or Hugging Face id org/name from the local cache "
                        "(default: the bundled k2-nano).")(f)


def sampling_options(f):
    for opt in reversed([
            click.option("--max-tokens", "-n", type=click.IntRange(0), help="Tokens to generate at most."),
            click.option("--temperature", type=click.FloatRange(0), help="0 = greedy."),
            click.option("--top-p", type=click.FloatRange(0, 1, min_open=True)),
            click.option("--top-k", type=click.IntRange(0), help="0 = off."),
            click.option("--min-p", type=click.FloatRange(0, 1)),
            click.option("--seed", type=int, help="Fixes every sampled token."),
            click.option("--system", help="System prompt (chat mode)."),
            click.option("--stop", multiple=True, help="Stop string (repeatable).")]):
        f = opt(f)
    return f


def template_options(f):
    f = click.option("--chat-template-kwargs", "template_kwargs", metavar="JSON", callback=_json_object,
                     help='Chat template variables, e.g. \'{"thinking": false}\' for K2.6.')(f)
    return click.option("--chat-template", "chat_template", metavar="FILE|NAME",
                         help="Chat template replacing the checkpoint's: a jinja file, a folder with "
                              "one, or kimi-k2-thinking / kimi-k2-instruct / kimi-k2.6.")(f)


def _json_object(ctx, param, value):
    if value is None:
        return {}
    try:
        v = json.loads(value)
    except ValueError as e:
        raise click.BadParameter(f"not JSON ({e})") from None
    if not isinstance(v, dict):
        raise click.BadParameter("must be a JSON object")
    return v


def weight_mode(weights: str) -> dict:
    return {"mmap": dict(), "load": dict(mmap=False), "repack": dict(repack=True)}[weights]


def load_model(model, device="cpu", threads=None, weights="mmap", chat_template=None, kv_cache=None):
    from .llm import default_model_dir, load
    return load(model or default_model_dir(), device=device, threads=threads, chat_template=chat_template,
                kv_cache=kv_cache, **weight_mode(weights))


def sampling(kw) -> dict:
    keys = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "seed")
    out = {k: kw[k] for k in keys if kw.get(k) is not None}
    if kw.get("stop"):
        out["stop"] = list(kw["stop"])
    return out


def print_stats(usage):
    """mlx-lm's verbose footer, on stderr."""
    err = lambda s: click.echo(s, err=True)   # noqa: E731
    err(f"Prompt: {usage.prompt_tokens} tokens, {usage.prompt_tps:.3f} tokens-per-sec")
    err(f"Generation: {usage.completion_tokens} tokens, {usage.generation_tps:.3f} tokens-per-sec")
    err(f"Peak memory: {usage.peak_memory / 1e9:.3f} GB")


def show_chat(stream, tty: bool, reasoning: bool):
    """Print chat deltas: the reasoning (dimmed on a terminal), the answer, tool calls as lines."""
    in_reasoning = False
    for d in stream:
        if "reasoning_content" in d:
            if reasoning:
                click.echo(click.style(d["reasoning_content"], dim=True) if tty else d["reasoning_content"], nl=False)
            in_reasoning = reasoning
        elif "content" in d:
            if in_reasoning:
                click.echo("\n")
                in_reasoning = False
            click.echo(d["content"], nl=False)
        elif "tool_call" in d:
            fn = d["tool_call"]["function"]
            click.echo(f"\n[tool call] {fn['name']}({fn['arguments']})")
    click.echo()
    return stream.result


@main.command()
@click.argument("prompt", required=False)
@model_options
@sampling_options
@click.option("--chat/--raw", "chat", default=None, help="Apply the chat template (default: chat "
              "when the checkpoint has one, raw for base models such as K2 Base and k2-nano).")
@template_options
@click.option("--json", "as_json", is_flag=True, help="Print one OpenAI-shaped JSON object.")
def generate(prompt, model, device, threads, weights, kv_cache, chat, chat_template, template_kwargs, as_json,
             **kw):
    """Complete PROMPT (or stdin), streaming the text as it is produced."""
    if prompt is None and not sys.stdin.isatty():
        prompt = sys.stdin.read()
    prompt = prompt or DEFAULT_PROMPT
    llm = load_model(model, device, threads, weights, chat_template, kv_cache)
    chat = llm.is_chat_model if chat is None else chat
    if chat and not llm.is_chat_model:
        raise click.UsageError(f"{llm.path} has no chat template (a base model): drop --chat, or give "
                               "one with --chat-template FILE|NAME")
    if kw["system"] and not chat:
        raise click.UsageError("--system needs --chat")
    if chat:
        messages = ([{"role": "system", "content": kw["system"]}] if kw["system"] else []) + \
                   [{"role": "user", "content": prompt}]
        stream = llm.stream_chat(messages, chat_template_kwargs=template_kwargs, **sampling(kw))
        if as_json:
            for _ in stream:
                pass
            result = stream.result
        else:
            result = show_chat(stream, sys.stdout.isatty(), reasoning=sys.stdout.isatty())
    else:
        stream = llm.stream(prompt, **sampling(kw))
        for delta in stream:
            if not as_json:
                click.echo(delta, nl=False)
        result = stream.completion
        if not as_json:
            click.echo()
    if as_json:
        click.echo(json.dumps(result.to_openai(), ensure_ascii=False))
    print_stats(result.usage)


@main.command()
@model_options
@sampling_options
@template_options
def chat(model, device, threads, weights, kv_cache, chat_template, template_kwargs, **kw):
    """Interactive multi-turn chat. /reset clears the history, /exit quits, Ctrl-C stops an answer."""
    llm = load_model(model, device, threads, weights, chat_template, kv_cache)
    if not llm.is_chat_model:
        raise click.UsageError(f"{llm.path} has no chat template (a base model): use k2lite generate, "
                               "or give one with --chat-template FILE|NAME")
    start = [{"role": "system", "content": kw["system"]}] if kw["system"] else []
    messages = list(start)
    seq = llm.sequence()        # the conversation's cache: each turn computes only what is new
    tty = sys.stdout.isatty()
    if sys.stdin.isatty():
        import readline  # noqa: F401  (line editing and history for input())
    click.echo(f"k2lite chat with {os.path.basename(os.path.normpath(llm.path))}: /reset, /exit, "
               "Ctrl-C stops an answer", err=True)
    while True:
        try:
            line = input(">> ")
        except (EOFError, KeyboardInterrupt):
            click.echo()
            return
        cmd = line.strip()
        if cmd in ("/exit", "/quit"):
            return
        if cmd == "/reset":
            messages = list(start)
            click.echo("[history cleared]", err=True)
            continue
        if not cmd:
            continue
        messages.append({"role": "user", "content": line})
        stream = llm.stream_chat(messages, sequence=seq, chat_template_kwargs=template_kwargs, **sampling(kw))
        try:
            show_chat(stream, tty, reasoning=True)
        except KeyboardInterrupt:
            stream.close()
            click.echo("\n[stopped]", err=True)
        if stream.result is not None:         # keep what was said, even when cut short
            messages.append(stream.result.message())
            u = stream.result.usage
            click.echo(click.style(f"[{u.completion_tokens} tokens, {u.generation_tps:.1f} tokens/s, "
                                   f"{u.prompt_tokens} in context, {u.cached_tokens} cached]", dim=True),
                       err=True)


@main.command()
@click.argument("path")
@click.option("--context", "-c", type=click.IntRange(1), default=4096, show_default=True,
              help="Tokens of context to size the KV cache for.")
def info(path, context):
    """Architecture, parameters, bytes and KV-cache memory of a checkpoint (or a config.json)."""
    from .info import chat_summary, model_info, summary
    click.echo(summary(model_info(path), context))
    click.echo(chat_summary(path))


@main.command()
@click.argument("path")
@click.option("-p", "n_prompt", type=click.IntRange(0), default=512, show_default=True, help="Prompt tokens.")
@click.option("-n", "n_gen", type=click.IntRange(0), help="Generated tokens [default: 128; 16 with --depth].")
@click.option("-r", "repeats", type=click.IntRange(1), help="Repetitions [default: 3; 1 with --depth].")
@click.option("--bw-bytes", type=click.IntRange(1 << 20), default=1 << 30, show_default=True,
              help="Size of the bandwidth probe array.")
@click.option("--depth", help="Comma-separated cache depths, e.g. 0,4096,32768: pp and tg with that many "
              "tokens already cached (synthetic fill, see k2lite/bench.py), and a projection to K2 Thinking.")
@click.option("--json", "as_json", is_flag=True, help="With --depth: one JSON object per line.")
@KV_CACHE
@click.option("--device", type=click.Choice(["cpu", "cuda", "ref"]), default="cpu", show_default=True)
@click.option("--threads", "-t", type=click.IntRange(1))
@WEIGHTS
def bench(path, n_prompt, n_gen, repeats, bw_bytes, depth, as_json, kv_cache, device, threads, weights):
    """Prompt-processing and generation tokens/s (llama-bench), with memory-bandwidth use."""
    from . import ops
    from .info import bench as run_bench, human, measure_bandwidth, model_info
    if depth is not None:
        from .bench import bench_depth
        return bench_depth(path, depth, n_prompt, 16 if n_gen is None else n_gen, repeats or 1, bw_bytes,
                           as_json, kv_cache, echo=click.echo, device=device, threads=threads,
                           **weight_mode(weights))
    if as_json:
        raise click.UsageError("--json goes with --depth")
    n_gen, repeats = 128 if n_gen is None else n_gen, repeats or 3
    mi = model_info(path)
    llm = load_model(path, device, threads, weights, kv_cache=kv_cache)
    results = run_bench(llm, n_prompt, n_gen, repeats)
    name = os.path.basename(os.path.normpath(path))
    click.echo("| model | size | params | backend | threads | test | t/s |")
    click.echo("| --- | ---: | ---: | --- | ---: | ---: | ---: |")
    for test, runs in results.items():
        sd = statistics.stdev(runs) if len(runs) > 1 else 0.0
        click.echo(f"| {name} | {human(mi.total_bytes)} | {human(mi.total_params, '')} | {ops.describe(llm.backend)} | "
                   f"{threads or os.cpu_count()} | {test} | {statistics.mean(runs):.2f} ± {sd:.2f} |")
    bw = measure_bandwidth(bw_bytes)
    click.echo(f"memory bandwidth: {human(bw)}/s (parallel sum over {human(bw_bytes)}, best of 3)")
    click.echo(f"decode reads {human(mi.decode_bytes_per_token)} of weights per token")
    tg = [k for k in results if k.startswith("tg")]
    if tg:
        used = statistics.mean(results[tg[0]]) * mi.decode_bytes_per_token
        click.echo(f"{tg[0]}: {human(used)}/s of weights read = {100 * used / bw:.2f}% of measured bandwidth")



@main.command()
@click.argument("path")
@click.option("--file", "-f", "file", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--ctx", "-c", type=click.IntRange(2), default=512, show_default=True, help="Window size.")
@click.option("--max-tokens", type=click.IntRange(2), help="Score only the first N tokens of the file.")
@click.option("--device", type=click.Choice(["cpu", "cuda", "ref"]), default="cpu", show_default=True)
@click.option("--threads", "-t", type=click.IntRange(1))
@KV_CACHE
def perplexity(path, file, ctx, max_tokens, device, threads, kv_cache):
    """Mean negative log-likelihood, perplexity and bits per byte of a text file, in --ctx windows."""
    import math

    from .generate import perplexity as ppl
    llm = load_model(path, device, threads, kv_cache=kv_cache)
    if llm.tokenizer is None:
        raise click.UsageError(f"{path} has no tokenizer (tiktoken.model)")
    with open(file, encoding="utf-8") as f:
        ids = llm.tokenizer.encode_ordinary(f.read())
    ids = ids[:max_tokens] if max_tokens else ids
    n, nll = ppl(llm, ids, ctx)
    # bits per byte: total NLL in bits over the UTF-8 bytes of the scored tokens (all but each
    # window's first), so it does not depend on the tokenizer
    n_bytes = sum(len(llm.tokenizer.token_bytes(t)) for i, t in enumerate(ids) if i % ctx)
    click.echo(f"tokens {len(ids)}  scored {n}  windows {-(-(len(ids) - 1) // ctx)} of {ctx}  "
               f"mean NLL {nll:.4f}  perplexity {math.exp(nll):.3f}  "
               f"bits/byte {nll * n / math.log(2) / max(n_bytes, 1):.4f}")


@main.command()
@click.argument("src")
@click.argument("dst")
@click.option("--experts", type=click.Choice(["int4", "bf16"]), default="int4", show_default=True,
              help="Format of the routed experts; everything else is written BF16.")
@click.option("--group", type=click.IntRange(8), default=32, show_default=True, help="INT4 group size.")
@click.option("--qat-grid", is_flag=True, help="Use levels -7..7 (K2 Thinking's QAT grid) instead of -8..7.")
@click.option("--shard-size", type=click.IntRange(1), default=4, show_default=True, help="GB per output shard.")
@click.option("--no-resume", is_flag=True, help="Start over instead of resuming an interrupted run.")
def convert(src, dst, experts, group, qat_grid, shard_size, no_resume):
    """Convert a BF16 / FP8 / INT4 checkpoint to the INT4 release layout, streaming."""
    from .convert import convert as run
    st = run(src, dst, experts=experts, group_size=group, qat_grid=qat_grid,
             max_shard_bytes=shard_size << 30, resume=not no_resume)
    click.echo(f"{st['bytes_in'] / 1e9:.2f} GB -> {st['bytes_out'] / 1e9:.2f} GB in {st['seconds']:.1f} s "
               f"({st['bytes_in'] / 1e9 / max(st['seconds'], 1e-9):.2f} GB/s read), "
               f"peak RSS {st['peak_rss_mb']:.0f} MB", err=True)


def api_keys(keys, key_file) -> list:
    """--api-key (repeatable; K2LITE_API_KEY may hold several, space-separated) and --api-key-file
    (one key per line; blank lines and # comments skipped)."""
    out = [k for arg in keys for k in arg.split()]
    if key_file:
        with open(key_file, encoding="utf-8") as f:
            out += [ln.strip() for ln in f if ln.strip() and not ln.strip().startswith("#")]
    return out


@main.command()
@model_options
@click.option("--revision", help="Branch, tag or commit of a Hugging Face id given to -m (default: main).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Bind address (loopback by default).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--max-batch", type=click.IntRange(1), default=8, show_default=True,
              help="Sequences decoded together in one step.")
@click.option("--context", type=click.IntRange(1), help="Tokens per sequence (prompt + answer).")
@click.option("--cache-tokens", type=click.IntRange(1), help="KV cache size in tokens (default max-batch x context).")
@click.option("--max-queue", type=click.IntRange(0), help="Requests that may wait for cache; beyond: HTTP 429.")
@click.option("--default-max-tokens", type=click.IntRange(1), help="Answer limit when a request sets none.")
@click.option("--api-key", "keys", multiple=True, envvar="K2LITE_API_KEY",
              help="Require 'Authorization: Bearer KEY' on /v1/* and /metrics (repeatable; env K2LITE_API_KEY).")
@click.option("--api-key-file", type=click.Path(exists=True, dir_okay=False), help="Accepted keys, one per line.")
@click.option("--served-model-name", "names", multiple=True,
              help="The model id clients send (repeatable: the first is listed, all are accepted).")
@click.option("--max-connections", type=click.IntRange(1), default=1024, show_default=True,
              help="Open connections at most; requests beyond get 503.")
@template_options
def serve(model, device, threads, weights, kv_cache, revision, host, port, max_batch, context, cache_tokens, max_queue,
          default_max_tokens, keys, api_key_file, names, max_connections, chat_template, template_kwargs):
    """OpenAI-compatible server and chat page: /, /v1/chat/completions, /v1/completions, /v1/models, /health, /metrics.
    --chat-template-kwargs are the defaults a request's chat_template_kwargs go over."""
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise click.ClickException('the server needs its extra: pip install "k2lite[serve]"') from None
    from .config import Config
    from .hub import resolve
    from .llm import default_model_dir, load
    from .serve import serve as run
    model = model or default_model_dir()
    path = resolve(model, revision)
    names = list(names) + ([model] if path != model and model not in names else [])  # "org/name" as sent
    ctx = int(context or min(Config.from_json(os.path.join(path, "config.json")).max_position_embeddings, 1 << 20))
    # room for max_batch whole contexts at most; the pool grows only as pages are used
    llm = load(path, device=device, threads=threads, context=ctx, max_cache_tokens=cache_tokens or max_batch * ctx,
               chat_template=chat_template, kv_cache=kv_cache, **weight_mode(weights))
    run(llm, host=host, port=port, max_batch=max_batch, max_queue=max_queue, default_max_tokens=default_max_tokens,
        api_keys=api_keys(keys, api_key_file), model_name=names, max_connections=max_connections,
        chat_template_kwargs=template_kwargs)


@main.command()
@click.argument("repo_id")
@click.option("--revision", help="Branch, tag or commit (default: main).")
@click.option("--include", multiple=True, help="Only files matching this glob (repeatable), e.g. '*.json'.")
def download(repo_id, revision, include):
    """Fetch a Hugging Face model into the local cache (resumable), for -m ORG/NAME."""
    from .hub import download as fetch
    click.echo(fetch(repo_id, revision=revision, include=include))


if __name__ == "__main__":
    main()
