"""Host utilities: paths, files, processes, CPU, memory, allocator, sizes, network."""
