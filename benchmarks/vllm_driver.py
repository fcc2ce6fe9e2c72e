"""Greedy generation in vLLM for several checkpoints (run in the vLLM venv; imports nothing of pruneflow).

Input (a JSON file, argv[1]): {"models": [dir, ...], "prompts": [[ids], ...], "max_tokens": N, "dtype": "float32"}.
Output (argv[2]): {dir: {"tokens": [[ids], ...], "logprobs": [[float], ...]} or {"error": text}}.
"""
import json
import sys


def main() -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    job = json.load(open(sys.argv[1]))
    # greedy, exactly max_tokens tokens (an EOS does not stop it: the caller compares every step)
    params = SamplingParams(temperature=0.0, max_tokens=job["max_tokens"], logprobs=1, ignore_eos=True)
    results = {}
    for model in job["models"]:
        try:
            llm = LLM(model=model, dtype=job.get("dtype", "float32"), enforce_eager=True, trust_remote_code=True,
                      max_model_len=job.get("max_model_len", 128), skip_tokenizer_init=True, seed=0)
            outs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in job["prompts"]], params)
            results[model] = {
                "tokens": [list(o.outputs[0].token_ids) for o in outs],
                "logprobs": [[step[t].logprob for t, step in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)]
                             for o in outs]}
            llm.llm_engine.engine_core.shutdown()
            del llm
        except Exception as err:  # reported per model: the caller says which one vLLM refused and why
            results[model] = {"error": f"{type(err).__name__}: {err}"}
    json.dump(results, open(sys.argv[2], "w"))


if __name__ == "__main__":
    main()
