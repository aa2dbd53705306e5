"""What the CLI starts: a simulated or deployed run end to end, re-evaluation."""
