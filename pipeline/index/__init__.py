"""Index stage: propose a FAISS layout (pure), build it on the workers, read and search an index file."""
