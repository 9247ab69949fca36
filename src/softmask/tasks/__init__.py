"""Tasks: what each training command learns (pretraining, image pretraining, the downstream tasks), each as
its objective (the ``nn.Module`` the shared loop trains: a batch in, losses out), its data and its evaluation."""
