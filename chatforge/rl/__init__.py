"""Reinforcement learning from feedback: the pieces PPO and GRPO/RLOO share, as plain functions.

prompts.py   read and render prompts; the per-step prompt loader (checkpointed)
roles.py     actor, frozen reference and reward (memory report, offloading of frozen roles)
rollout.py   sample -> RolloutBatch tensors -> log-probs/values; collect() -> a Rollout; its metrics and samples
stats.py     statistics over every rank, finiteness checks, the final score of a response
update.py    epochs x shuffled minibatches, one optimizer step each (Trainer.accumulate)
timing.py    seconds per phase of a step (gen, logp, ref, reward, value, update) in its metrics row
reward.py    reward sources (a reward model or a Python function); kl_controller.py: fixed/adaptive beta
Nothing here imports chatforge.stages; the algorithms themselves live in stages/ppo.py and stages/grpo.py.
"""
