"""The RL algorithms: the K-wise ranking loss and its trainer, reward models, PPO and its arithmetic."""
