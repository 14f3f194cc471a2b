"""Everything that touches Ray lives here: starting/joining a Ray session, the shard actors
that fit backends, and the Ray Train job that trains the classifier. The rest of raysl is
plain numpy/PyTorch."""
