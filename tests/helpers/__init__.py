"""What the tests share: background servers, the fake framework, PKI, own-model artifacts,
synthetic comparison results, and the child programs some tests start."""
