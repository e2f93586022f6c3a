"""lm-evaluation-harness on chatforge models, in-process and offline.

    model.py   ChatforgeLM: lm-eval's ``LM`` over chatforge's model loading and generation engine
    run.py     evaluate a model directory on tasks -> results JSON in the model directory + a table
    tasks/     task YAMLs whose data are local files (SST-2 sentiment, WikiText-2 perplexity)
"""
