// Keyboard shortcuts for the answer form: each radio button's data-key picks it; Enter saves.
(function () {
  "use strict";
  var form = document.getElementById("answer-form");
  if (!form) { return; }
  document.addEventListener("keydown", function (event) {
    if (event.ctrlKey || event.altKey || event.metaKey) { return; }
    if (event.key === "Enter") {
      event.preventDefault();
      form.requestSubmit();
      return;
    }
    var key = event.key.toLowerCase();
    var inputs = form.querySelectorAll("input[data-key]");
    for (var i = 0; i < inputs.length; i++) {
      if (inputs[i].dataset.key === key) {
        inputs[i].checked = true;
        inputs[i].focus();
        event.preventDefault();
        return;
      }
    }
  });
  var image = document.getElementById("study-image");
  if (image) { form.querySelector("input[type=radio]").focus(); }
})();
