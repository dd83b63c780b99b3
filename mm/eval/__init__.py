"""Evaluation the field uses (issue 19): mm's own runner and scorers for benchmark files in their published
formats (`mm-eval`), and adapters that plug mm checkpoints into lm-evaluation-harness and lmms-eval.

    benchmarks.py   the benchmark interface (`Item`, `Benchmark`); catalog.py: the benchmarks by name
    extract.py      answers from free text: yes / no (MME's and POPE's rules), option letters (MMBench)
    mme.py, mmbench.py, pope.py, refcoco.py   one module per benchmark: read its files, score its records
    runner.py       prompts -> batched generation -> per-sample JSONL (sharded, resumable) -> summary + report
    report.py       the Markdown + PNG report of a summary
    text_model.py   a checkpoint's text side as harnesses call it (log-likelihoods, generation; batched)
    harness_lm.py   the lm-evaluation-harness model `mm` (text: loglikelihood, rolling, generate_until)
    compare.py      `mm-eval compare`: base LLM vs the IAA text workflow on lm-eval tasks, VLM tasks on `mm`

Nothing here imports lm_eval or lmms_eval at module level except the adapter modules, which are used only
where the `eval` extra is installed.
"""
