"""The data layer: dataset sources (IDX, digits, npz) and the prepared splits. numpy only: the
prepare stage never imports torch."""
