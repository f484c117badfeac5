"""The cloud half of specd: the verifier daemon that holds the target model."""
