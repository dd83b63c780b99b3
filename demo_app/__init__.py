"""The main job's pieces (`configs/demo.py`): embedded data, stage configs, evaluation and the report.

The demo reproduces the Inner-Adaptor Architecture's claim on a CPU in minutes: a tiny base LLM learns a text
task, then an IAA model (LLM frozen) and a LLaVA-style model (LLM trained) learn the same multimodal data on
the same budget; the report compares text-task exact match (the IAA text workflow equals the base) with
multimodal QA accuracy and grounding Acc@0.5.
"""
