"""Greedy generation and offline throughput in vLLM for several checkpoints. Run by the vLLM engine tests and
benchmarks/deploy.py in vLLM's own venv (.venv-vllm); it imports nothing of pruneflow.

Input (a JSON file, argv[1]): {"models": [dir, ...], "prompts": [[ids], ...], "max_tokens": N, "dtype":
"float32", "max_model_len": 128, "throughput": {"requests", "prompt_tokens", "max_tokens", "rounds"} (optional)}.
Output (argv[2]): {dir: {"tokens": [[ids], ...], "logprobs": [[float], ...], "throughput_tok_s": float} or
{"error": text}} — one failing model does not stop the others.
"""
import json
import random
import statistics
import sys
import time


def throughput(llm, load: dict) -> float:
    """Output tokens/s of ``requests`` random prompts generated as one batch (greedy, no EOS stop): one warm-up
    round, then the median of ``rounds``."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    vocab = llm.llm_engine.model_config.get_vocab_size()
    rng = random.Random(0)
    prompts = [TokensPrompt(prompt_token_ids=[rng.randrange(1, vocab) for _ in range(load["prompt_tokens"])])
               for _ in range(load["requests"])]
    params = SamplingParams(temperature=0.0, max_tokens=load["max_tokens"], ignore_eos=True)
    rates = []
    for round_ in range(load["rounds"] + 1):
        started = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - started
        if round_:
            rates.append(sum(len(o.outputs[0].token_ids) for o in outs) / seconds)
    return statistics.median(rates)


def main() -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    job = json.load(open(sys.argv[1]))
    results = {}
    for model in job["models"]:
        try:
            llm = LLM(model=model, dtype=job.get("dtype", "float32"), enforce_eager=True, trust_remote_code=True,
                      max_model_len=job.get("max_model_len", 128), skip_tokenizer_init=True, seed=0)
            result = {}
            if job["prompts"]:
                # greedy, exactly max_tokens tokens (an EOS does not stop it: the caller compares every step)
                params = SamplingParams(temperature=0.0, max_tokens=job["max_tokens"], logprobs=1, ignore_eos=True)
                outs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in job["prompts"]], params,
                                    use_tqdm=False)
                result["tokens"] = [list(o.outputs[0].token_ids) for o in outs]
                result["logprobs"] = [[step[t].logprob for t, step in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)]
                                      for o in outs]
            if job.get("throughput"):
                result["throughput_tok_s"] = throughput(llm, job["throughput"])
            results[model] = result
            llm.llm_engine.engine_core.shutdown()
            del llm
        except Exception as err:  # reported per model: the caller says which one vLLM refused and why
            results[model] = {"error": f"{type(err).__name__}: {err}"}
    json.dump(results, open(sys.argv[2], "w"))


if __name__ == "__main__":
    main()
