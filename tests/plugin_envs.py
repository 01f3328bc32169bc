"""Environment plug-ins for the multi-turn tests (loaded as tests/plugin_envs.py:Class)."""

from grpo_mlx.envs.environments import Environment, Observation


class AlwaysAnswer(Environment):
    """Answers every turn with a numbered observation, so a trajectory runs until --max-turns."""

    def reset(self, example):
        self.count = 0

    def step(self, messages, turn_text):
        self.count += 1
        return Observation([{"role": "user", "content": f"observation {self.count}: 42"}], tool_calls=1,
                           tool_errors=self.count % 2, tool_seconds=0.001)
