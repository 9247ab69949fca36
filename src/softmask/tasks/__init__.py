"""Tasks: a model wrapper whose forward turns a batch into losses, plus its data, on the shared loop."""
