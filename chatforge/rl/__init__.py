"""Reinforcement learning from feedback: rollouts, rewards, KL control and the pieces PPO and GRPO/RLOO share."""
