"""Expert routing for benchmarks and analysis: routing models, traces, their recording and replay."""
