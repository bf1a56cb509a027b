"""What every step uses: files through Beam's filesystems, model loading, error rows, progress."""
