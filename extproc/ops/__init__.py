"""Operations: wiring a process together (`up`, `serve`, workers), leader election, graceful
drain, child processes and the status endpoint."""
