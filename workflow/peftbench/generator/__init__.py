"""Seed 004: a prompt-to-LoRA parameter generator as a branch of the DAG.

Stages (rules in ``workflow/rules/generator.smk``, artefacts under ``results/generator/{name}/``):

1. checkpoint collection: LoRA runs save adapter snapshots along training (the runtime key
   ``snapshots``; :class:`peftbench.train.Snapshots`);
2. parameter tokenisation and prompt sets (rule ``tokenize_params``, :mod:`.dataset`): every
   snapshot as a ``(T, D)`` token matrix (:mod:`.params`, exactly invertible), per-token
   normalisation statistics per split, prompts (batches of training sentences of each task),
   and the splits: ``in_task`` (held-out prompts) and ``loto_<task>`` (leave-one-task-out:
   zero-shot for the held-out task);
3. generator training (rule ``train_generator``, :mod:`.fit`; the model in :mod:`.model`);
4. generation and evaluation (rule ``evaluate_generator``, :mod:`.evaluate`): generated adapters
   written as peft adapters and scored on the task's dev set by :func:`peftbench.train.evaluate`,
   next to the trained LoRA, the mean of the training checkpoints and the head alone;
5. summary and figures (rule ``generator_report``, :mod:`.report`).

Liang et al. 2025, "Drag-and-Drop LLMs: Zero-Shot Prompt-to-Weights", arXiv:2506.16406.
"""
