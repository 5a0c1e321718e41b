"""The synthetic NSE feed (``nadi simulate``): ticks, redundant feeds, Kafka, recovery, bhavcopy."""
